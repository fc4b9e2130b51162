"""The shapes model: a Stable-Diffusion-shaped pipeline small enough to train on a CPU, and the scorer that plays
CLIP score's and FID's role for it.

The U-Net keeps what makes DeepCache's branches mean what they mean on SD: several down/up blocks, two layers per
block, skip connections between them, and cross-attention to the caption (only at the low resolutions, like
SDXL). Three blocks give nine branches.
"""

from __future__ import annotations

import torch
from torch import nn

from .data import ATTRIBUTES, RESOLUTION

VAE_CONFIG = {  # one downsampling: 32x32x3 images <-> 16x16x4 latents
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu", "layers_per_block": 1,
    "block_out_channels": [32, 32], "norm_num_groups": 16, "sample_size": RESOLUTION,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
}
UNET_CONFIG = {
    "sample_size": RESOLUTION // 2, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [32, 64, 64], "norm_num_groups": 16, "cross_attention_dim": 64, "attention_head_dim": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
TEXT_CONFIG = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
    "max_position_embeddings": 16, "hidden_act": "quick_gelu", "projection_dim": 64,
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
}
# DDPM's linear schedule, not SD's scaled-linear one: in 16x16 latents SD's schedule leaves enough signal at
# t = T (sqrt(alpha_bar) 0.068; a quadrant's mean of 256 noise values has std 0.06) for the model to read the
# shape's position off the starting noise instead of the prompt. Measured: trained with it for 1000 steps,
# shape, colour and size were right 98% of the time and position at chance (20%). Linear: sqrt(alpha_bar_T) 0.006.
# v-prediction: with epsilon prediction the loss at high noise, where the prompt has to decide where the shape
# goes, weighs that decision by about alpha_bar (nothing): 1000 more steps on the linear schedule left position
# at chance. The v loss at high noise is a loss on the predicted image.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "v_prediction",
}

# shapes-sd3: the same task on Stable Diffusion 3's architecture. Six joint blocks, the first three with SD 3.5
# Medium's dual attention and the last one context_pre_only (as diffusers builds every SD3 transformer), so that
# head/tail choices cut a stack that looks like SD 3.5's. Latents are the shapes VAE's (16x16x4): patch 2 gives
# 8x8 image tokens. The two CLIP encoders' penultimate states (64 + 64) fill joint_attention_dim; their pooled
# projections (64 + 64) are pooled_projection_dim; text_encoder_3 (T5) is None, which the pipeline replaces by
# 256 zero tokens (its max_sequence_length default), so the model is trained with exactly those.
SD3_TRANSFORMER_CONFIG = {
    "sample_size": RESOLUTION // 2, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 6,
    "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 128, "caption_projection_dim": 64,
    "pooled_projection_dim": 128, "pos_embed_max_size": 16, "dual_attention_layers": [0, 1, 2],
    "qk_norm": "rms_norm",
}
SD3_TEXT_CONFIG = {**TEXT_CONFIG}  # CLIPTextModelWithProjection: hidden 64 and projection 64 each
SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length default: zeros when text_encoder_3 is None
# Rectified flow as SD 3 trains it: x_t = (1 - sigma) x0 + sigma noise, the model predicts noise - x0 at
# timestep 1000 sigma. SD 3 shifts sigmas by 3.0 for 128x128 latents; the shift grows with the number of latent
# pixels, and 16x16 latents take none (1.0). At sigma = 1 the input is pure noise, so no trace of the image can
# leak into the first step (the U-Net's schedule needed care for that, above).
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0}


def build_components(seed: int = 0) -> dict:
    """Untrained components; the training script fills them in."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from .data import vocabulary
    from .tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocabulary())
    return {
        "vae": diffusers.AutoencoderKL(**VAE_CONFIG),
        "unet": diffusers.UNet2DConditionModel(**UNET_CONFIG),
        "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT_CONFIG)),
        "tokenizer": tokenizer,
        "scheduler": diffusers.DDIMScheduler(**SCHEDULER_CONFIG),
    }


def build_sd3_components(seed: int = 0) -> dict:
    """Untrained shapes-sd3 transformer, text encoders, tokenizers and scheduler (the VAE is the shapes model's,
    with SD 3's shift_factor: see build_scripts/train_shapes_sd3.py)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .data import vocabulary
    from .tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocabulary())
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), **SD3_TEXT_CONFIG)
    return {
        "transformer": diffusers.SD3Transformer2DModel(**SD3_TRANSFORMER_CONFIG),
        "text_encoder": CLIPTextModelWithProjection(text_config),
        "text_encoder_2": CLIPTextModelWithProjection(text_config),
        "tokenizer": tokenizer, "tokenizer_2": build_tokenizer(vocabulary()),
        "text_encoder_3": None, "tokenizer_3": None,
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
    }


class Scorer(nn.Module):
    """A small CNN that reads shape, colour, size and position off a 32x32 image. `features` (the input of the
    heads) is what the FID-like distance compares."""

    FEATURES = 128

    def __init__(self):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(block(3, 32, 1), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2),
                                  block(128, 128, 2), nn.Flatten(), nn.Linear(128 * 4 * 4, self.FEATURES), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(self.FEATURES, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images: float NCHW in [-1, 1]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {name: head(f) for name, head in self.heads.items()}
