"""The shapes model: a small Stable-Diffusion-shaped text-to-image pipeline trained on CPU on procedurally drawn
coloured shapes, shipped in dcaccel/weights/shapes, with the scorer that measures whether an image shows what its
prompt asked for. It exists so that DeepCache's fidelity is measured on a model that has learned something.

    data.py       the captioned image set, deterministic by seed; attribute lists; held-out scenes
    tokenizer.py  a word-level CLIP tokenizer for the captions
    model.py      component configs and the scorer network
    score.py      prompt accuracy and the Fréchet distance on scorer features
"""

from __future__ import annotations

import json
import os

from .data import ATTRIBUTES, Scene, all_scenes, held_out_scenes, training_scenes

GUIDANCE_SCALE = 4.0  # classifier-free guidance the model was evaluated with
DEFAULT_PROMPT = "a large red circle at the top left"


def parse_caption(text: str) -> Scene | None:
    """The scene a prompt describes, if it is one of the captions the model knows (else None)."""
    for scene in all_scenes():
        if scene.caption == " ".join(text.lower().split()):
            return scene
    return None


def load_scorer(model_dir: str | None = None):
    """The scorer shipped beside the pipeline (fp16 on disk, float32 in memory)."""
    from safetensors.torch import load_file

    from ..models import trained_model_dir
    from .model import Scorer

    model_dir = model_dir or trained_model_dir("shapes")
    path = os.path.join(model_dir, "scorer", "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no scorer in {model_dir!r}: expected scorer/model.safetensors there, as "
                                f"build_scripts/train_shapes.py writes it (or use the shipped shapes model's)")
    scorer = Scorer()
    state = load_file(path)
    scorer.load_state_dict({k: v.float() for k, v in state.items()})
    return scorer.eval()


def metadata(model_dir: str | None = None) -> dict:
    """What the training script recorded: steps, VAE PSNR, scorer accuracy on real images and reconstructions."""
    from ..models import trained_model_dir

    with open(os.path.join(model_dir or trained_model_dir("shapes"), "shapes.json")) as f:
        return json.load(f)


__all__ = ["ATTRIBUTES", "DEFAULT_PROMPT", "GUIDANCE_SCALE", "Scene", "all_scenes", "held_out_scenes",
           "load_scorer", "metadata", "parse_caption", "training_scenes"]
