"""Memory a TensorRT build of SD 3.5 needs, estimated from the architecture (no GPU here: nothing is built or run).

For each architecture, cut and dtype, counted on a meta-device copy (no weights, no arithmetic):

- engine files: each graph's weights in the build dtype (a plan holds its weights once; kernels and metadata
  are small beside them). The shallow engine holds its own copy of the embeddings and the head and tail blocks.
- activations: the peak of live intermediate tensors while the full graph runs eagerly on the meta device, at
  the build's shapes (attention counted as one fused op, as TensorRT's fused attention runs it; a tensor that
  replaces another is briefly counted twice, so this leans high). A proxy for TensorRT's
  `engine.device_memory_size`, which only a build reports.
- buffers: dcaccel's bound inputs, outputs and cached features of both graphs.
- GPU at serving: both engines, the activation scratch once (the graphs run one at a time), the buffers, and the
  pipeline's other components (SD 3.5's official text encoders and VAE, counted from their configurations), with
  the transformer's own weights released (enable(..., release_weights=True); without it, add them).
- host RAM beyond the pipeline: the export steps (export, weight map, constants check) at the ratio measured on
  this machine for SD 3.5 Medium (the same export code; see README), then TensorRT's build of the full graph: its
  ONNX parser reads the graph's weights into host memory (1x) and the builder returns the plan in host memory
  (about 1x): 2x, an estimate from the documented API, not measured.

    python benchmarks/trt_memory.py --export-ratio 0.39 --out benchmarks/results/2026-12-08-trt-memory
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from dcaccel.config import BuildConfig  # noqa: E402
from dcaccel.families import get_family  # noqa: E402
from dcaccel.graphs.spec import GRAPHS, call_graph  # noqa: E402
from dcaccel.models import architecture_config  # noqa: E402

GIB = 1 << 30
BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
# SD 3.5's text encoders and VAE as the official model repositories configure them (the embedded architectures
# replace the text encoders with small stand-ins): CLIP ViT-L/14 and OpenCLIP bigG/14 text towers with
# projections, the T5 v1.1 XXL encoder, and the 16-channel VAE.
TEXT_ENCODERS = {
    "text_encoder (CLIP-L)": ("clip", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, projection_dim=768, vocab_size=49408,
                                           max_position_embeddings=77, hidden_act="quick_gelu")),
    "text_encoder_2 (CLIP-G)": ("clip", dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                             num_attention_heads=20, projection_dim=1280, vocab_size=49408,
                                             max_position_embeddings=77, hidden_act="gelu")),
    "text_encoder_3 (T5-XXL encoder)": ("t5", dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                                   vocab_size=32128, feed_forward_proj="gated-gelu")),
}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors produced inside the block and still alive (freed when their last reference goes)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t._is_view():
                nbytes = t.numel() * t.element_size()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, nbytes)
        return out

    def _free(self, nbytes):
        self.live -= nbytes


def fused_sdpa(query, key, value, *args, **kwargs):
    """Attention as one fused op (TensorRT's fused MHA, flash attention): only its output is allocated. On the
    meta device PyTorch would decompose it into matmuls with the full score matrix."""
    return query.new_empty(query.shape[:-1] + value.shape[-1:])


def params_bytes(module: torch.nn.Module, itemsize: int) -> int:
    return sum(p.numel() for p in module.parameters()) * itemsize  # parameters() counts a shared one once


def other_components(itemsize: int, vae_config: dict) -> dict[str, int]:
    import diffusers
    import transformers

    out = {}
    with torch.device("meta"):
        for name, (kind, cfg) in TEXT_ENCODERS.items():
            model = (transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg)) if kind == "clip"
                     else transformers.T5EncoderModel(transformers.T5Config(**cfg)))
            out[name] = params_bytes(model, itemsize)
        out["vae"] = params_bytes(diffusers.AutoencoderKL(**vae_config), itemsize)
    return out


def estimate(arch: str, cut: dict, dtype: str, size: int, export_ratio: float) -> dict:
    import diffusers

    cfg = architecture_config(arch)
    family = get_family("mmdit")
    with torch.device("meta"):
        model = diffusers.SD3Transformer2DModel(**cfg["transformer"]).to(getattr(torch, dtype)).eval()
    itemsize = BYTES[dtype]
    build = BuildConfig(height=size, width=size, dtype=dtype, **cut)
    specs = family.graph_specs(model, cut, build, {"vae_scale_factor": 8, "text_len": 77 + 256})
    graphs = dict(zip(GRAPHS, family.split(model, cut)))
    engines = {name: params_bytes(graphs[name], itemsize) for name in GRAPHS}
    tensors = {t.name: t for name in GRAPHS for t in specs[name].inputs + specs[name].outputs}
    buffers = sum(torch.Size(t.shape).numel() * torch.empty(0, dtype=t.torch_dtype).element_size()
                  for t in tensors.values())
    activations = {}
    for name in GRAPHS:
        inputs = specs[name].sample_inputs(device="meta")
        sdpa = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = fused_sdpa
        try:
            with torch.no_grad(), LiveBytes() as live:
                out = call_graph(graphs[name], specs[name], inputs)
                del out
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
        activations[name] = live.peak
    others = other_components(itemsize, cfg["vae"])
    weights = params_bytes(model, itemsize)
    serving = engines["full"] + engines["shallow"] + max(activations.values()) + buffers + sum(others.values())
    return {
        "arch": arch, "cut": cut, "dtype": dtype, "size": size, "denoiser_weights": weights,
        "engine_full": engines["full"], "engine_shallow": engines["shallow"], "activations": activations,
        "buffers": buffers, "other_components": others, "gpu_serving": serving,
        "gpu_serving_without_t5": serving - others["text_encoder_3 (T5-XXL encoder)"],
        "host_export_beyond_pipeline": export_ratio * engines["full"],
        "host_trt_build_beyond_pipeline": 2 * engines["full"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["sd35m", "sd35l"])
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=sorted(BYTES))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--cuts", nargs="+", default=["0:1", "1:1"], help="head:tail pairs")
    p.add_argument("--export-ratio", type=float, required=True,
                   help="peak host memory the export steps add beyond the pipeline (before any engine is opened), "
                        "in units of the exported graph's weights, as measured here")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    for arch in args.archs:
        for text in args.cuts:
            head, tail = (int(x) for x in text.split(":"))
            for dtype in args.dtypes:
                if dtype == "bfloat16" and "float16" in args.dtypes:
                    continue  # same byte counts as float16: one row stands for both
                rows.append(estimate(arch, {"head_blocks": head, "tail_blocks": tail}, dtype, args.size,
                                     args.export_ratio))
    g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
    lines = [f"# TensorRT memory estimates for SD 3.5 ({datetime.date.today()}, counted on meta-device copies; "
             "nothing built or run)", "",
             f"{args.size}x{args.size}, batch 2 (guidance), 333-token context; fp16 and bf16 have the same sizes. "
             f"Export steps' host memory: {args.export_ratio}x the full graph's weights (measured here on SD 3.5 "
             "Medium); the TensorRT build's 2x is estimated from the API, not measured. GPU serving assumes "
             "release_weights=True.", "",
             "| model | cut | denoiser weights GiB | engines full + shallow GiB | activations (full graph) GiB | "
             "GPU serving GiB (with T5 / without) | host RAM beyond the pipeline: export / TensorRT build GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | head {r['cut']['head_blocks']}, tail {r['cut']['tail_blocks']} | "
                     f"{g(r['denoiser_weights'])} | {g(r['engine_full'])} + {g(r['engine_shallow'])} | "
                     f"{g(r['activations']['full'])} | {g(r['gpu_serving'])} / {g(r['gpu_serving_without_t5'])} | "
                     f"{g(r['host_export_beyond_pipeline'])} / {g(r['host_trt_build_beyond_pipeline'])} |")
    others = rows[0]["other_components"] if rows else {}
    lines += ["", "Other components in " + rows[0]["dtype"] + ": " +
              ", ".join(f"{k} {g(v)} GiB" for k, v in others.items()) if rows else ""]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "README.md").write_text(text)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
