"""bf16 end to end on tiny models (SD 3 and a U-Net): eager graphs equal the plain bf16 pipeline bit for bit at
interval 1; a torch_compile build records bfloat16 in its manifest, equals eager within the bf16 tolerance the
backend documents and refuses an fp32 pipeline (naming the dtypes); ONNX Runtime refuses bf16 builds with what it takes; the graphs
hold no copy of the pipeline's weights (their parameters are the pipeline's tensors)."""

import functools

import pytest
import torch

import dcaccel
from dcaccel import DeepCacheConfig
from dcaccel.errors import EngineError


@functools.lru_cache(maxsize=None)
def _pipe(arch):
    from dcaccel.models import build_pipeline

    pipe = build_pipeline(arch, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, steps=6):
    return pipe("a red circle", num_inference_steps=steps, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def _ours(pipe, config, **options):
    dcaccel.enable(pipe, config, **options)
    try:
        return _run(pipe)
    finally:
        dcaccel.disable(pipe)


@pytest.mark.parametrize("arch", ["tiny-sd3", "tiny"])
def test_bf16_at_interval_one_is_the_plain_bf16_pipeline(arch):
    pipe = _pipe(arch)
    plain = _run(pipe)
    assert plain.dtype == torch.bfloat16
    torch.testing.assert_close(_ours(pipe, DeepCacheConfig(interval=1)), plain, rtol=0, atol=0)
    cached = _ours(pipe, DeepCacheConfig(interval=3))
    assert cached.dtype == torch.bfloat16 and torch.isfinite(cached.float()).all() and not torch.equal(cached, plain)


@pytest.mark.parametrize("arch", ["tiny-sd3", "tiny"])
def test_eager_graphs_hold_no_copy_of_the_weights(arch):
    pipe = _pipe(arch)
    dcaccel.enable(pipe, DeepCacheConfig(interval=2))
    try:
        state = dcaccel.enabled_state(pipe)
        model = {t.data_ptr() for t in list(state.model.parameters()) + list(state.model.buffers())}
        for name, graph in state.runner.graphs.items():
            tensors = list(graph.parameters()) + list(graph.buffers())
            assert tensors and all(t.data_ptr() in model for t in tensors), name
    finally:
        dcaccel.disable(pipe)


def test_onnxruntime_refuses_bf16_with_what_it_takes(tmp_path):
    pytest.importorskip("onnxruntime")
    from dcaccel.config import BuildConfig
    from dcaccel.engines import build_engines

    with pytest.raises(ValueError, match="onnxruntime builds take dtype float32 or float16, got 'bfloat16'"):
        build_engines(_pipe("tiny-sd3"), BuildConfig(height=32, width=32, backend="onnxruntime", dtype="bfloat16"),
                      out_dir=tmp_path, model_name="tiny-sd3")
    assert not any(tmp_path.rglob("manifest.json"))


@pytest.mark.slow  # two graphs compiled in bf16
def test_bf16_torch_compile_build(tmp_path):
    from dcaccel.backends import torch_compile
    from dcaccel.config import BuildConfig
    from dcaccel.engines import Manifest, build_engines
    from dcaccel.models import build_pipeline

    pipe = _pipe("tiny-sd3")
    cfg = DeepCacheConfig(interval=3, head_blocks=1, tail_blocks=1)
    eager = _ours(pipe, cfg)
    directory, _ = build_engines(pipe, BuildConfig(height=32, width=32, head_blocks=1, tail_blocks=1,
                                                   backend="torch_compile", dtype="bfloat16",
                                                   options={"freezing": False}),
                                 out_dir=tmp_path, model_name="tiny-sd3")
    assert Manifest.read(directory).data["build"]["dtype"] == "bfloat16"
    dcaccel.enable(pipe, cfg, backend="torch_compile", engine_dir=directory)
    try:
        state = dcaccel.enabled_state(pipe)
        model = {t.data_ptr() for t in state.model.parameters()}
        assert all(p.data_ptr() in model for g in state.runner.graphs.values() for p in g.parameters())
        got = _run(pipe)
    finally:
        dcaccel.disable(pipe)
    atol, rtol = torch_compile.TOLERANCE["bfloat16"]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), eager.float(), atol=atol, rtol=rtol)
    fp32 = build_pipeline("tiny-sd3")
    from dcaccel.errors import EngineError

    with pytest.raises(EngineError, match=r"build.dtype: engine has \"bfloat16\", pipeline needs \"float32\""):
        dcaccel.enable(fp32, cfg, backend="torch_compile", engine_dir=directory)


# -- release_weights: the engine holds the only copy ------------------------------------------------------------------


def _fresh_pipe(arch, controlnets=0):
    import diffusers

    from dcaccel.models import build_pipeline

    pipe = build_pipeline(arch, "text2img", seed=0, **({"controlnets": controlnets} if controlnets else {}))
    if arch != "tiny-sd3":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def tiny_ort_engine(tmp_path_factory):
    """An ONNX Runtime engine of the tiny U-Net (every _fresh_pipe("tiny") has the same weights)."""
    pytest.importorskip("onnxruntime")
    from dcaccel.config import BuildConfig
    from dcaccel.engines import build_engines

    directory, _ = build_engines(_fresh_pipe("tiny"), BuildConfig(height=32, width=32, backend="onnxruntime"),
                                 out_dir=tmp_path_factory.mktemp("engines"), model_name="tiny")
    return directory


def test_release_weights_frees_the_denoiser_and_keeps_the_engine_output(tmp_path, tiny_ort_engine):
    from conftest import run_latents

    from dcaccel.config import BuildConfig
    from dcaccel.engines import build_engines

    pipe, directory = _fresh_pipe("tiny"), tiny_ort_engine
    dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="onnxruntime", engine_dir=directory)
    kept = run_latents(pipe)
    dcaccel.disable(pipe)
    unet = pipe.unet
    size = sum(p.numel() for p in unet.parameters())
    dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="onnxruntime", engine_dir=directory,
                   release_weights=True)
    assert size > 0 and sum(p.numel() for p in unet.parameters()) == 0  # every parameter's storage is gone
    assert pipe.unet.dtype == torch.float32 and pipe.unet.device.type == "cpu"
    torch.testing.assert_close(run_latents(pipe), kept, rtol=0, atol=0)
    torch.testing.assert_close(run_latents(pipe), kept, rtol=0, atol=0)  # and again: nothing else read them
    with pytest.raises(RuntimeError, match="release_weights=True"):
        pipe.load_lora_weights({"x": torch.zeros(1)})  # diffusers' loaders cannot write into released weights
    dcaccel.disable(pipe)
    with pytest.raises(RuntimeError, match="weights were released by dcaccel.enable"):
        run_latents(pipe)  # the plain pipeline cannot run any more, and says why
    for backend, options in (("eager", {}), ("onnxruntime", {"engine_dir": directory})):
        with pytest.raises(EngineError, match="weights were released"):  # nothing is cut or built from them again
            dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend=backend, **options)
    with pytest.raises(EngineError, match="weights were released"):
        build_engines(pipe, BuildConfig(height=32, width=32, backend="onnxruntime"), out_dir=tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_release_weights_frees_them_before_the_engine_loads(tiny_ort_engine, monkeypatch):
    """The two copies never coexist at load: the weights go once the engine is checked against the pipeline and
    before the backend opens its files; an engine that fails to load after that says the weights are gone, and
    the pipeline refuses to be enabled again."""
    from dcaccel.backends import onnxruntime as ort_backend

    pipe, directory = _fresh_pipe("tiny"), tiny_ort_engine
    load, seen = ort_backend.load, []

    def spy(*args, **kwargs):
        seen.append(sum(p.numel() for p in pipe.unet.parameters()))
        return load(*args, **kwargs)

    monkeypatch.setattr(ort_backend, "load", spy)
    dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="onnxruntime", engine_dir=directory)
    dcaccel.disable(pipe)
    dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="onnxruntime", engine_dir=directory,
                   release_weights=True)
    dcaccel.disable(pipe)
    assert seen[0] > 0 and seen[1] == 0, seen  # kept while loading without release; gone before loading with it

    def fails(*args, **kwargs):  # what a file ONNX Runtime rejects (after the manifest's checks) looks like
        raise EngineError("ONNX Runtime cannot load shallow.onnx (InvalidProtobuf)")

    monkeypatch.setattr(ort_backend, "load", fails)
    other = _fresh_pipe("tiny")
    with pytest.raises(EngineError, match=r"cannot load .* weights were already released by release_weights=True"):
        dcaccel.enable(other, DeepCacheConfig(interval=3), backend="onnxruntime", engine_dir=directory,
                       release_weights=True)
    assert not dcaccel.is_enabled(other)
    with pytest.raises(EngineError, match="weights were released"):
        dcaccel.enable(other, DeepCacheConfig(interval=3), backend="onnxruntime", engine_dir=directory)


def test_release_weights_is_refused_where_the_graphs_use_the_weights():
    pipe = _fresh_pipe("tiny")
    for backend in ("eager", "torch_compile"):
        with pytest.raises(ValueError, match="release_weights=True needs an engine"):
            dcaccel.enable(pipe, None, backend=backend, release_weights=True)
        assert not dcaccel.is_enabled(pipe)
    assert sum(p.numel() for p in pipe.unet.parameters()) > 0
    sd3 = _fresh_pipe("tiny-sd3")  # the dynamic schedule's probe runs on the transformer's own weights
    with pytest.raises(ValueError, match="cannot go with schedule='dynamic'"):
        dcaccel.enable(sd3, DeepCacheConfig(schedule="dynamic", threshold=0.2), backend="onnxruntime", height=32,
                       width=32, release_weights=True)
    assert not dcaccel.is_enabled(sd3) and sum(p.numel() for p in sd3.transformer.parameters()) > 0


@pytest.mark.slow  # an ONNX Runtime build of a ControlNet pipeline: about 40 s
def test_release_weights_on_a_controlnet_pipeline():
    pytest.importorskip("onnxruntime")
    from test_controlnet import run

    pipe = _fresh_pipe("tiny", controlnets=1)
    dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="onnxruntime", height=32, width=32)
    kept = run(pipe)
    dcaccel.disable(pipe)
    dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="onnxruntime", height=32, width=32,
                   release_weights=True)
    assert sum(p.numel() for p in pipe.controlnet.parameters()) == 0
    torch.testing.assert_close(run(pipe), kept, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="ControlNet's weights were released"):  # called outside the step loop
        pipe.controlnet(torch.zeros(2, 4, 4, 4), 1, torch.zeros(2, 77, 32), torch.zeros(2, 3, 32, 32))
    dcaccel.disable(pipe)
    with pytest.raises(RuntimeError, match="weights were released"):
        run(pipe)


def test_bf16_graphs_export_to_onnx_for_tensorrt(tmp_path):
    """TensorRT's bf16 engines are built from a bf16 ONNX export (no GPU here to build them): the export must be
    a valid model typed bfloat16 in its weights, outputs and inputs (timesteps stay fp32), and compute what
    eager bf16 computes: ONNX's reference evaluator (the only bf16 runtime here: ONNX Runtime's CPU kernels take
    no bf16 MatMul) rounds every op to bf16, so its distance to fp32 may be a few times eager bf16's, and it must
    stay under the backend's bf16 tolerance."""
    import copy

    import numpy as np
    import onnx
    from onnx.reference import ReferenceEvaluator

    from dcaccel.backends import tensorrt
    from dcaccel.config import BuildConfig
    from dcaccel.families.mmdit import graph_specs, split_transformer
    from dcaccel.graphs.onnx import export_onnx
    from dcaccel.graphs.spec import call_graph

    transformer = _pipe("tiny-sd3").transformer
    graphs = dict(zip(("full", "shallow"), split_transformer(transformer, 1, 1)))
    graphs32 = dict(zip(("full", "shallow"), split_transformer(copy.deepcopy(transformer).float(), 1, 1)))
    specs = graph_specs(transformer, 1, 1, BuildConfig(height=32, width=32, dtype="bfloat16"), 8, 16)
    bf16 = onnx.TensorProto.BFLOAT16
    for name in ("full", "shallow"):
        path = tmp_path / f"{name}.onnx"
        export_onnx(graphs[name], specs[name], path)
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
        assert types.pop("timestep") == onnx.TensorProto.FLOAT  # the spec keeps timesteps in fp32
        assert types and set(types.values()) == {bf16}, types
        weights = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, bf16)]
        assert weights and all(i.data_type == bf16 for i in weights)

        inputs = specs[name].sample_inputs(seed=3)
        with torch.no_grad():
            eager = call_graph(graphs[name], specs[name], inputs)
            fp32 = call_graph(graphs32[name], specs[name],
                              {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()})
        feeds = {k: v.float().numpy().astype(onnx.helper.tensor_dtype_to_np_dtype(bf16)) if v.is_floating_point()
                 else v.numpy() for k, v in inputs.items() if k in {i.name for i in model.graph.input}}
        got = ReferenceEvaluator(model).run(None, feeds)
        assert len(got) == len(specs[name].output_names)
        for out_name, value in zip(specs[name].output_names, got):
            value = torch.from_numpy(np.asarray(value).astype(np.float32))
            want = fp32[out_name]
            err, eager_err = ((x - want).norm() / want.norm() for x in (value, eager[out_name].float()))
            assert err < 3 * eager_err + 1e-3 and err < tensorrt.TOLERANCE["bfloat16"][1], \
                f"{name}/{out_name}: relative L2 to fp32 {err:.3g}, eager bf16's {eager_err:.3g}"
