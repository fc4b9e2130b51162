"""Diffusers operations that the graphs run, in a form every backend takes.

FreeU (arXiv 2309.11497, diffusers' `apply_freeu`) scales half of an up block's backbone channels and filters its
skip connection in the Fourier domain. Diffusers filters with torch.fft, which neither ONNX export nor TensorRT
takes, and scales in place, which would write into the graph input that holds DeepCache's feature. Here:

  - `apply_freeu` scales out of place (the same values) and filters with diffusers' own `fourier_filter`, so an
    eager or compiled graph computes exactly what diffusers does;
  - inside `exportable()` (ONNX export), the filter is the same linear map written as two real matrix products:
    the filter keeps every frequency but the 2x2 block at the centre of the shifted spectrum, which it scales, so
    filtered = x + (scale - 1) * Re(A_h x A_w^T), with A_n[p, m] = 1/n * sum over those two frequencies k of
    exp(2 pi i k (p - m) / n). Equal to the FFT form within float32 rounding (tests/test_compat.py measures it).
    Diffusers' own up blocks call the exportable form too while the context is active.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch

_EXPORTING = threading.local()
FREEU_KEYS = ("s1", "s2", "b1", "b2")


def exporting() -> bool:
    return getattr(_EXPORTING, "on", False)


@contextlib.contextmanager
def exportable():
    """Graphs traced inside this block use the exportable forms (no torch.fft, nothing in place)."""
    from diffusers.models.unets import unet_2d_blocks

    before, saved = exporting(), unet_2d_blocks.apply_freeu
    _EXPORTING.on = True
    unet_2d_blocks.apply_freeu = _diffusers_apply_freeu
    try:
        yield
    finally:
        _EXPORTING.on = before
        unet_2d_blocks.apply_freeu = saved


def _diffusers_apply_freeu(resolution_idx, hidden_states, res_hidden_states, **freeu_kwargs):
    return apply_freeu(resolution_idx, hidden_states, res_hidden_states, freeu_kwargs)


def apply_freeu(resolution_idx: int, hidden_states: torch.Tensor, res_hidden_states: torch.Tensor,
                factors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' apply_freeu without writing into `hidden_states`: FreeU acts on up blocks 0 and 1 only."""
    if resolution_idx not in (0, 1):
        return hidden_states, res_hidden_states
    b, s = (factors["b1"], factors["s1"]) if resolution_idx == 0 else (factors["b2"], factors["s2"])
    half = hidden_states.shape[1] // 2
    hidden_states = torch.cat([hidden_states[:, :half] * b, hidden_states[:, half:]], dim=1)
    if exporting():
        return hidden_states, fourier_filter_matmul(res_hidden_states, s)
    from diffusers.utils.torch_utils import fourier_filter

    return hidden_states, fourier_filter(res_hidden_states, threshold=1, scale=s)


def _centre_basis(n: int, threshold: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of A_n (see the module's docstring), float64, for the rows fourier_filter masks."""
    centre = n // 2
    shifted = list(range(n))[centre - threshold:centre + threshold]  # the slice fourier_filter assigns
    freqs = [(j - centre) % n for j in shifted]                      # fftshift puts frequency 0 at n // 2
    d = torch.arange(n, dtype=torch.float64)
    diff = d[:, None] - d[None, :]
    re = sum((torch.cos(2 * math.pi * k * diff / n) for k in freqs), torch.zeros(n, n, dtype=torch.float64)) / n
    im = sum((torch.sin(2 * math.pi * k * diff / n) for k in freqs), torch.zeros(n, n, dtype=torch.float64)) / n
    return re, im


def fourier_filter_matmul(x_in: torch.Tensor, scale: float, threshold: int = 1) -> torch.Tensor:
    """diffusers' fourier_filter as real matrix products (computed in float32, as diffusers does)."""
    x = x_in.to(torch.float32)
    h, w = x.shape[-2:]
    rh, ih = (t.to(device=x.device, dtype=torch.float32) for t in _centre_basis(h, threshold))
    rw, iw = (t.to(device=x.device, dtype=torch.float32) for t in _centre_basis(w, threshold))
    low = torch.matmul(torch.matmul(rh, x), rw.T) - torch.matmul(torch.matmul(ih, x), iw.T)
    return (x + (scale - 1.0) * low).to(x_in.dtype)
