"""A captioned image set drawn by code: coloured shapes of several kinds, sizes and positions on varied
backgrounds. Deterministic by seed, so the training set, the held-out set and the evaluation prompts can be
regenerated anywhere without downloading anything.

    "a small red circle at the top left"
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (235, 215, 40)}
SIZES = {"small": 10, "large": 16}  # side of the bounding box, in pixels of a 32x32 image
POSITIONS = {  # centre of the shape, as a fraction of the image side
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS)}
RESOLUTION = 32
SUPERSAMPLE = 4  # shapes are drawn 4x larger and downsampled, so edges are anti-aliased
# Held out of training: the model never sees these combinations; accuracy on them measures composition.
HELD_OUT_SEED = 1234
NUM_HELD_OUT = 12


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}"

    def labels(self) -> dict[str, int]:
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def all_scenes() -> list[Scene]:
    return [Scene(*combo) for combo in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)]


def held_out_scenes() -> list[Scene]:
    """A fixed set of attribute combinations that training never sees."""
    scenes = all_scenes()
    picks = np.random.default_rng(HELD_OUT_SEED).choice(len(scenes), NUM_HELD_OUT, replace=False)
    return [scenes[i] for i in sorted(picks)]


def training_scenes() -> list[Scene]:
    held = set(held_out_scenes())
    return [s for s in all_scenes() if s not in held]


def calibration_scenes() -> list[Scene]:
    """The 11 captions schedules are calibrated on (every 10th training scene): disjoint from evaluation_scenes()."""
    return training_scenes()[::10]


def evaluation_scenes() -> list[Scene]:
    """Every scene but the calibration ones (the held-out combinations included): what calibrated schedules are
    judged on."""
    cal = set(calibration_scenes())
    return [s for s in all_scenes() if s not in cal]


def vocabulary() -> list[str]:
    words = {"a", "at", "the", "in"}
    for scene in all_scenes():
        words.update(scene.caption.split())
    return sorted(words)


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    """A pale or dark grey-ish vertical/horizontal gradient with a slight tint: varied, never a shape colour."""
    base = rng.uniform(0.15, 0.85)
    tint = rng.uniform(-0.06, 0.06, size=3)
    slope = rng.uniform(-0.15, 0.15)
    axis = np.linspace(-0.5, 0.5, side)
    ramp = axis[:, None] if rng.random() < 0.5 else axis[None, :]
    value = base + slope * ramp
    rgb = np.clip(value[..., None] + tint[None, None, :], 0, 1) * np.ones((side, side, 3))
    return Image.fromarray((rgb * 255).astype(np.uint8))


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One 32x32 RGB image (uint8, HWC) of `scene`, with jitter in place, size and hue drawn from `rng`."""
    side = RESOLUTION * SUPERSAMPLE
    image = _background(rng, side)
    draw = ImageDraw.Draw(image)
    cx, cy = POSITIONS[scene.position]
    cx = (cx * RESOLUTION + rng.uniform(-1.5, 1.5)) * SUPERSAMPLE
    cy = (cy * RESOLUTION + rng.uniform(-1.5, 1.5)) * SUPERSAMPLE
    half = SIZES[scene.size] * rng.uniform(0.9, 1.1) * SUPERSAMPLE / 2
    colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[scene.colour])
    if scene.shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=colour)
    elif scene.shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=colour)
    else:  # an upward equilateral-ish triangle in the same box
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(SUPERSAMPLE / 4))
    return np.asarray(image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX))


def make_dataset(n: int, seed: int, scenes: list[Scene] | None = None) -> tuple[np.ndarray, list[Scene]]:
    """`n` images (uint8, NHWC) and their scenes, cycling through `scenes` (default: the training scenes) in a
    seeded random order. The same (n, seed, scenes) always gives the same images."""
    scenes = training_scenes() if scenes is None else scenes
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(scenes)) for _ in range(math.ceil(n / len(scenes)))])[:n]
    picked = [scenes[i] for i in order]
    return np.stack([render(s, rng) for s in picked]), picked


def to_tensor(images: np.ndarray):
    """uint8 NHWC -> float NCHW in [-1, 1], the range the VAE works in."""
    import torch

    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def labels_tensor(scenes: list[Scene]):
    import torch

    return {name: torch.tensor([s.labels()[name] for s in scenes]) for name in ATTRIBUTES}
