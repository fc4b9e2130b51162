"""Scoring generated images the way the DeepCache paper scores SD with CLIP score and FID, with the shapes scorer
in CLIP's and Inception's place: prompt accuracy (all four attributes read back as the prompt asked) and a
Fréchet distance between scorer features of generated and real images."""

from __future__ import annotations

import numpy as np
import torch

from .data import ATTRIBUTES, Scene, labels_tensor


@torch.no_grad()
def predict(scorer, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    """images: float NCHW in [-1, 1]. Returns the predicted index per attribute."""
    out = {name: [] for name in ATTRIBUTES}
    for chunk in images.split(batch):
        for name, logits in scorer(chunk).items():
            out[name].append(logits.argmax(1))
    return {name: torch.cat(v) for name, v in out.items()}


def accuracy(scorer, images: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Per-attribute accuracy and `all`: the fraction of images with every attribute as the prompt asked."""
    pred, true = predict(scorer, images), labels_tensor(scenes)
    hits = {name: pred[name] == true[name] for name in ATTRIBUTES}
    result = {name: float(h.float().mean()) for name, h in hits.items()}
    result["all"] = float(torch.stack(list(hits.values())).all(0).float().mean())
    return result


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two batches of images in [-1, 1], over the [0, 1] range, averaged per image."""
    mse = ((a - b) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def chance_accuracy() -> float:
    """Prompt accuracy of uniformly random guesses, for all attributes at once."""
    return float(np.prod([1 / len(v) for v in ATTRIBUTES.values()]))


@torch.no_grad()
def features(scorer, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    return torch.cat([scorer.features(c) for c in images.split(batch)]).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula), via the eigenvalues of
    sqrt(S_a) S_b sqrt(S_a) so that no complex matrix square root is needed."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def pipeline_images(pipe, scenes: list[Scene], seed: int, steps: int = 20, guidance_scale: float = 4.0,
                    batch: int = 64, after_batch=None) -> torch.Tensor:
    """Images of `scenes`' captions as float NCHW in [-1, 1]; image i uses the generator seeded `seed + i`, so
    two runs (with and without DeepCache) see the same initial noise per prompt. `after_batch()` is called
    after each pipeline call (to collect per-call statistics)."""
    out = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe([s.caption for s in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generators, output_type="pt").images
        out.append(images.float() * 2 - 1)
        if after_batch is not None:
            after_batch()
    return torch.cat(out)
