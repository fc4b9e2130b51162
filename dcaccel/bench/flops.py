"""FLOPs of the split graphs (attention counted with a formula: torch 2.13's counter has none for CPU SDPA), and
the speedup bound they set for a schedule."""

from __future__ import annotations

import logging
import math

import torch

from ..config import BuildConfig
from ..graphs.spec import GRAPHS, call_graph

logger = logging.getLogger(__name__)


def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(q k^T) v counted as its two batched matmuls, 2*B*L*S*E + 2*B*L*S*Ev (B = all leading
    dims); the softmax is not counted, as FlopCounterMode counts no elementwise op."""
    *lead, length, e = query_shape
    s, ev = key_shape[-2], value_shape[-1]
    b = math.prod(lead)
    return 2 * b * length * s * e + 2 * b * length * s * ev


SDPA_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",  # what CPU attention runs in torch 2.13: no formula there
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)


def sdpa_flop_formulas() -> dict:
    """A custom_mapping for FlopCounterMode: a formula for each SDPA kernel torch's counter has none for."""
    from torch.utils.flop_counter import flop_registry

    out = {}
    for name in SDPA_KERNELS:
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_registry:
            out[op] = sdpa_flops
    return out


def count_flops(module: torch.nn.Module, spec_or_inputs, inputs: dict | None = None) -> int:
    """FLOPs of one call of a split graph on named inputs (count_flops(graph, spec, inputs)), or of
    module(**inputs) (count_flops(module, inputs)), attention included."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=sdpa_flop_formulas()) as counter:
        if inputs is None:
            module(**spec_or_inputs)
        else:
            call_graph(module, spec_or_inputs, inputs)
    return int(counter.get_total_flops())


def graph_flops(family, denoiser, cut: dict, build: BuildConfig, geometry: dict) -> dict:
    """FLOPs of one call of the full and of the shallow graph at `build`'s shapes, cut as `cut` says.

    Counted on a copy of the architecture on the meta device (no weights, no arithmetic; the counts equal those
    on CPU, see tests/test_bench.py), or on the model itself if that copy cannot be made.
    """
    specs = family.graph_specs(denoiser, cut, build, geometry)
    attempts = [("meta", "FlopCounterMode on a meta-device copy of the model"),
                (next(denoiser.parameters()).device, "FlopCounterMode on the model")]
    for device, method in attempts:
        try:
            model = _meta_copy(denoiser) if device == "meta" else denoiser
            graphs = dict(zip(GRAPHS, family.split(model, cut)))
            counts = {name: count_flops(graphs[name], specs[name], specs[name].sample_inputs(device=device))
                      for name in GRAPHS}
            return {**counts, "method": method}
        except Exception as e:  # a kernel without a meta implementation, say: count on the real model
            logger.info("FLOP count (%s) failed: %s", method, e)
    raise RuntimeError("could not count the FLOPs of the split graphs")


def _meta_copy(model):
    """The same architecture on the meta device (a ControlledUNet: its U-Net and ControlNets)."""
    if hasattr(model, "controlnets"):
        from ..families.controlnet import ControlledUNet

        return ControlledUNet(_meta_copy(model.unet), [_meta_copy(cn) for cn in model.controlnets])
    with torch.device("meta"):
        return type(model).from_config(model.config).eval()


def theoretical_speedup(num_evaluations: int, n_full: int, n_shallow: int, f_full: int, f_shallow: int) -> float:
    """N * F_full / (n_full * F_full + n_shallow * F_shallow): the bound FLOPs set for this schedule."""
    return num_evaluations * f_full / (n_full * f_full + n_shallow * f_shallow)
