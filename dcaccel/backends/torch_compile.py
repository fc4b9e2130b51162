"""torch.compile: each graph compiled on its own, whole graph, static shapes, warmed up at load.

Inputs are copied into buffers allocated once from the spec, so every call presents the compiled graphs with
the same tensors (same shapes, strides, dtypes and dispatch keys): nothing can trigger a recompile, and after
warm-up the runner sets the "fail_on_recompile" stance around each call to prove it.

On CPU, inductor's weight freezing (default there) is what makes compilation pay: measured on SD 1.5, plain
inductor ran at 0.79x of eager and frozen inductor at 1.33x. Frozen weights are constants of the compiled code,
so new weights (a LoRA swap) recompile; with freezing=False weights change in place without recompiling.
A build saves inductor's cache artifacts (torch.compiler.save_cache_artifacts) so that loading is warm.
"""

from __future__ import annotations

import contextlib
import logging
import time
import types
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..graphs.buffers import CacheBuffers, allocate_graph_buffers
from ..graphs.spec import call_graph
from .base import BackendOptions, check_static_shapes, device_of, option

logger = logging.getLogger(__name__)

NAME = "torch_compile"
VERSIONS = ("torch",)  # inductor's cache artifacts and frozen graphs belong to one torch
TOLERANCE = {"float32": (2e-3, 2e-3), "float16": (5e-2, 5e-2), "bfloat16": (1e-1, 1e-1)}
STRICT = False  # compiled kernels reorder float sums: reported in the manifest, warned about beyond TOLERANCE
FILES_REQUIRED = False
CACHE_FILE = "compile_cache.bin"
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Options(BackendOptions):
    backend = NAME
    mode: str = option("default", "torch.compile mode; reduce-overhead and max-autotune use CUDA graphs (CUDA "
                                  "only)", build=True, choices=MODES)
    freezing: bool | None = option(None, "inductor weight freezing: faster on CPU, but new weights (a LoRA swap) "
                                         "recompile; default: on for CPU, off for CUDA", build=True, kind=bool)

    def resolved(self, device: torch.device) -> "Options":
        return self if self.freezing is not None else replace(self, freezing=device.type == "cpu")


class CompiledRunner:
    follows_settings = True  # refit compiles the new graphs when their settings (FreeU) changed

    def __init__(self, graphs, specs, options: Options, cache_bytes: bytes | None = None):
        device = device_of(graphs)
        options = options.resolved(device)
        if options.mode == "reduce-overhead" and device.type != "cuda":
            raise ValueError("torch_compile mode 'reduce-overhead' uses CUDA graphs and needs the model on a CUDA "
                             "device")
        self.options, self.specs = options, specs
        self.freezing, self.mode = options.freezing, options.mode
        self.loras: list[dict] = []
        buffers, self.static_shapes = allocate_graph_buffers(specs, device)
        self.inputs = {name: buffers[name] for name in self.static_shapes}
        self.cache_buffers = CacheBuffers(specs["full"].cache, specs, device)
        if cache_bytes:
            torch.compiler.load_cache_artifacts(cache_bytes)
        self.graphs = graphs
        self.full, self.shallow = self._compile(graphs)
        self.compile_seconds = self._warm_up()
        self.extras: dict = {}  # graphs a family adds (skip-layer guidance): compiled at their first use

    @property
    def cache(self) -> dict[str, torch.Tensor]:
        return self.cache_buffers.tensors

    @property
    def feature(self) -> torch.Tensor | None:
        return self.cache.get("feature")

    def _compile(self, graphs):
        compiled = []
        for name in ("full", "shallow"):
            _private_forward(graphs[name])
            compiled.append(torch.compile(graphs[name], fullgraph=True, dynamic=False, mode=self.mode))
        return tuple(compiled)

    def refit(self, graphs) -> float:
        """Take the weights of `graphs`. Returns the seconds spent compiling (0.0 if none).

        freezing=False: the compiled graphs read the parameters as inputs, and new values land in the same
        tensors, so there is nothing to do; the fail_on_recompile stance proves it at the next call.
        freezing=True (the CPU default): the weights are constants of the compiled code, so both graphs are
        compiled again, which costs as much as the first compile (that is the price of freezing's speed). Either
        way the graphs are compiled again if their modules are other objects than those compiled, or their
        settings (FreeU's factors) changed.
        """
        same = all([id(p) for p in graphs[n].parameters()] == [id(p) for p in self.graphs[n].parameters()]
                   for n in ("full", "shallow"))
        settings = all(getattr(graphs[n], "graph_settings", None) == getattr(self.graphs[n], "graph_settings", None)
                       for n in ("full", "shallow"))
        if same and settings and not self.freezing:
            return 0.0
        logger.info("torch.compile refit: compiling both graphs again (%s)",
                    "the graphs' settings changed" if not settings else
                    "freezing=True: weights are constants" if same else "the model's modules changed")
        old = self.graphs, self.full, self.shallow
        self.extras.clear()  # compiled again at their next use, from the new weights
        self.graphs = graphs
        self.full, self.shallow = self._compile(graphs)
        try:
            seconds = self._warm_up()
        except BaseException:
            self.graphs, self.full, self.shallow = old
            raise
        self.compile_seconds = seconds
        return seconds

    def _inductor_config(self):
        import torch._inductor.config as inductor_config

        return inductor_config.patch(freezing=self.freezing)

    def _warm_up(self) -> float:
        """Compile both graphs now, on the bound buffers, so no pipeline call pays for it."""
        start = time.perf_counter()
        sample = self.specs["full"].sample_inputs(device=next(iter(self.inputs.values())).device)
        for name, t in self.inputs.items():
            t.copy_(sample[name])
        with self._inductor_config():
            for _ in range(2):
                self.run_full(self.inputs, _warm=True)
                self.run_shallow(self.inputs, _warm=True)
        seconds = time.perf_counter() - start
        logger.info("torch.compile (mode=%s, freezing=%s): both graphs compiled in %.1f s", self.mode,
                    self.freezing, seconds)
        return seconds

    @contextlib.contextmanager
    def _calling(self, warm: bool):
        """Every call of the compiled graphs, warm-up included, under the same autograd state: no grad, not in
        inference mode (dynamo guards on the dispatch keys inference mode drops, so a pipeline called under
        torch.inference_mode would otherwise recompile), and after warm-up the fail_on_recompile stance."""
        with torch.inference_mode(False), torch.no_grad():
            if warm:
                yield
            else:
                with torch.compiler.set_stance("fail_on_recompile"):
                    yield

    def _copy_in(self, inputs, spec):
        check_static_shapes(self.static_shapes, inputs, "this torch.compile runner")
        for t in spec.call_inputs:
            if inputs[t.name] is not self.inputs[t.name]:
                self.inputs[t.name].copy_(inputs[t.name])
        return {t.name: self.inputs[t.name] for t in spec.call_inputs}

    def run_full(self, inputs, _warm=False):
        spec = self.specs["full"]
        with self._calling(_warm):
            out = call_graph(self.full, spec, self._copy_in(inputs, spec))
            self.cache_buffers.store(out)
            return out[spec.output_names[0]].clone()

    def run_shallow(self, inputs, _warm=False):
        spec = self.specs["shallow"]
        with self._calling(_warm):
            out = call_graph(self.shallow, spec, {**self._copy_in(inputs, spec), **self.cache_buffers.get()})
            return out[spec.output_names[0]].clone()

    def run_extra(self, key, make, inputs):
        """A graph outside the DeepCache schedule (skip-layer guidance), compiled at its first use (that call
        pays for the compile; its shapes are the call's, static from then on)."""
        if key not in self.extras:
            graph = make()
            _private_forward(graph)
            self.extras[key] = torch.compile(graph, fullgraph=True, dynamic=False, mode=self.mode)
            logger.info("torch.compile: compiling the %s graph at its first use", key[0])
        with self._inductor_config(), torch.inference_mode(False), torch.no_grad():
            return self.extras[key](**inputs).clone()

    def close(self) -> None:
        pass


def _private_forward(graph: torch.nn.Module) -> None:
    """Give `graph` its own copy of its class's forward code. Dynamo keeps compiled code per code object and
    guards on what a frozen graph does not depend on (not the weights' values): with a shared code object, a
    graph compiled again for new frozen weights would be served the old compiled code. With its own, the
    compiled code belongs to this graph alone and is freed with it."""
    fn = type(graph).forward
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    graph.forward = types.MethodType(own, graph)


def build(graphs, specs, directory: Path, options: Options):
    """Compile both graphs and save inductor's cache artifacts for a warm load. Returns the runner it compiled
    (the engine layer checks it against eager)."""
    runner = CompiledRunner(graphs, specs, options)
    artifacts = torch.compiler.save_cache_artifacts()
    files = {}
    if artifacts is not None:
        (Path(directory) / CACHE_FILE).write_bytes(artifacts[0])
        files = {"cache": CACHE_FILE}
    info = {"full": {"files": files, "compile_seconds": round(runner.compile_seconds, 2)},
            "shallow": {"files": {}}}
    return info, runner


def load(graphs, specs, options: Options, directory=None, graph_files=None) -> CompiledRunner:
    """Compile for the specs' static shapes (warm from a build's cache artifacts when there is one)."""
    cache = None
    if directory is not None and graph_files and graph_files["full"].get("cache"):
        cache = (Path(directory) / graph_files["full"]["cache"]).read_bytes()
    return CompiledRunner(graphs, specs, options, cache_bytes=cache)
