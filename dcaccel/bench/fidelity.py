"""How far a configuration's output is from a reference: latent relative L2, PSNR and SSIM of decoded images."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, data_range]; inf for identical images."""
    mse = float(((x.double() - ref.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) of images (B, C, H, W) or (C, H, W) in [0, data_range].

    Gaussian window 11x11 with sigma 1.5, K1 = 0.01, K2 = 0.03, each channel on its own, statistics weighted by
    the window and taken over the valid region (no padding), the map averaged over pixels, channels and images.
    A side shorter than 11 shrinks the window to the largest odd size that fits.
    """
    if x.shape != ref.shape:
        raise ValueError(f"ssim needs images of one shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    if x.dim() == 3:
        x, ref = x[None], ref[None]
    x, ref = x.double(), ref.double()
    channels, height, width = x.shape[1:]
    size = min(window, height, width)
    size -= 1 - size % 2
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, size, size).to(x.device)

    def blur(t):
        return F.conv2d(t, kernel, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(ref)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(ref * ref) - mu_y ** 2
    cov = blur(x * ref) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], (B, 3, H, W) float32, as the pipeline's own decoding does it."""
    vae = pipe.vae
    cfg = vae.config
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / cfg.scaling_factor + mean
    else:
        latents = latents / cfg.scaling_factor
    with torch.no_grad():
        images = vae.decode(latents, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()


@dataclass
class Output:
    """What a configuration produced for one step count: the latents of its first call, decoded once."""

    latents: torch.Tensor
    images: torch.Tensor


def fidelity(out: Output, ref: Output) -> dict:
    p = psnr(out.images, ref.images)
    return {"latent_rel_l2": rel_l2(out.latents, ref.latents), "psnr_db": None if math.isinf(p) else p,
            "images_identical": math.isinf(p), "ssim": ssim(out.images, ref.images)}
