"""Pipelines from configs kept in the repo (random weights) or from a local diffusers directory.

Compute cost does not depend on weight values, so the real SD 1.5 / SD 2.1 / SDXL architectures with random
weights measure speed honestly; the images they draw are noise. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources

import torch

logger = logging.getLogger(__name__)

ARCHITECTURES = ("tiny", "tiny-xl", "tiny-sd3", "sd15", "sd21", "sdxl", "sd35m", "sd35l")  # configs, random weights
TRAINED = ("shapes", "shapes-sd3")  # embedded trained weights (dcaccel/weights/<name>): see dcaccel/shapes
TRAINING_SCRIPTS = {"shapes": "train_shapes.py", "shapes-sd3": "train_shapes_sd3.py"}
TASKS = ("text2img", "img2img", "inpaint")

_PIPELINES = {
    ("sd", "text2img"): "StableDiffusionPipeline",
    ("sd", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sd", "inpaint"): "StableDiffusionInpaintPipeline",
    ("sdxl", "text2img"): "StableDiffusionXLPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline",
    ("sd3", "text2img"): "StableDiffusion3Pipeline",
    ("sd3", "img2img"): "StableDiffusion3Img2ImgPipeline",
    ("sd3", "inpaint"): "StableDiffusion3InpaintPipeline",
    ("sd", "controlnet-text2img"): "StableDiffusionControlNetPipeline",
    ("sd", "controlnet-img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd", "controlnet-inpaint"): "StableDiffusionControlNetInpaintPipeline",
    ("sdxl", "controlnet-text2img"): "StableDiffusionXLControlNetPipeline",
    ("sdxl", "controlnet-img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("sdxl", "controlnet-inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
}


def architecture_config(arch: str) -> dict:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {list(ARCHITECTURES)}")
    return json.loads(resources.files("dcaccel.configs").joinpath(f"{arch}.json").read_text())


def build_tokenizer(model_max_length: int = 77):
    """A character-level CLIP tokenizer (the byte-level alphabet, no merges): needs no download."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def build_components(arch: str, seed: int = 0) -> dict:
    """The components of an `arch` pipeline with random weights drawn from `seed`."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = architecture_config(arch)
    torch.manual_seed(seed)
    with torch.no_grad():
        comps = {"vae": diffusers.AutoencoderKL(**cfg["vae"]), "tokenizer": build_tokenizer()}
        if cfg["family"] == "sd3":
            comps.update(
                transformer=diffusers.SD3Transformer2DModel(**cfg["transformer"]),
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"])),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
                tokenizer_2=build_tokenizer(), text_encoder_3=None, tokenizer_3=None)
        else:
            comps.update(unet=diffusers.UNet2DConditionModel(**cfg["unet"]),
                         scheduler=diffusers.DDIMScheduler(**cfg["scheduler"]),
                         text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])))
            if cfg["family"] == "sd":
                comps.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            else:
                comps["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
                comps["tokenizer_2"] = build_tokenizer()
    for m in comps.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return comps


def pipeline_class(family: str, task: str):
    import diffusers

    if task.removeprefix("controlnet-") not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    return getattr(diffusers, _PIPELINES[(family, task)])


def build_controlnet(unet, vae_scale: int, seed: int = 0):
    """A ControlNet for `unet` (its encoder's architecture, as ControlNetModel.from_unet makes it) with random
    weights, its zero-initialised output convolutions included: trained ControlNets do not output zeros, and
    neither should the ones speed and equality are measured on. The conditioning embedding downsamples as the
    VAE does."""
    import diffusers

    levels = max(1, vae_scale.bit_length())  # 2 ** (levels - 1) == vae_scale
    channels = (16, 32, 96, 256)[:levels] if levels <= 4 else (16,) * levels
    torch.manual_seed(seed)
    with torch.no_grad():
        cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels,
                                                 load_weights_from_unet=False)
        for module in list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(module.weight, std=0.05)
            torch.nn.init.normal_(module.bias, std=0.05)
    return cn.eval()


def build_pipeline(arch: str = "tiny", task: str = "text2img", seed: int = 0, dtype: torch.dtype = torch.float32,
                   controlnets: int = 0):
    """A pipeline of the embedded architecture `arch` with random (untrained) weights; with `controlnets` >= 1,
    the ControlNet pipeline of `task` with that many ControlNets (a MultiControlNetModel for more than one)."""
    cfg = architecture_config(arch)
    comps = build_components(arch, seed)
    if controlnets:
        import diffusers

        if cfg["family"] == "sd3":
            raise ValueError("SD 3 ControlNets are not supported; ControlNets go with the U-Net architectures")
        vae_scale = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
        nets = [build_controlnet(comps["unet"], vae_scale, seed + 1 + k) for k in range(controlnets)]
        comps["controlnet"] = nets[0] if controlnets == 1 else diffusers.MultiControlNetModel(nets)
        task = f"controlnet-{task}"
    pipe = pipeline_class(cfg["family"], task)(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def trained_model_dir(name: str) -> str:
    """The directory of an embedded trained model, shipped inside the package."""
    path = str(resources.files("dcaccel").joinpath("weights", name))
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"the embedded {name!r} weights are missing from {path}: reinstall dcaccel, or "
                                f"train them with build_scripts/{TRAINING_SCRIPTS.get(name, 'train_shapes.py')} "
                                f"--out {path}")
    return path


def shipped_calibration(model: str) -> str | None:
    """The calibration file shipped with an embedded trained model (made by the command in README), or None."""
    if model not in TRAINED:
        return None
    path = os.path.join(str(resources.files("dcaccel").joinpath("weights", model)), "calibration.json")
    return path if os.path.isfile(path) else None


def _pipeline_dir(model: str) -> tuple[str, dict, str]:
    """(directory, model_index.json, family) of an embedded trained model or a local pipeline directory."""
    path = trained_model_dir(model) if model in TRAINED else model
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"model {model!r} is neither a local pipeline directory nor an embedded model "
            f"{list(TRAINED + ARCHITECTURES)}"
        )
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    return path, index, "sd3" if "transformer" in index else "sdxl" if "text_encoder_2" in index else "sd"


def denoiser_config(model: str) -> tuple[str, dict]:
    """(family, the denoiser's config) of `model` (as load_pipeline takes it), read without loading weights."""
    if model in ARCHITECTURES:
        cfg = architecture_config(model)
        return cfg["family"], cfg.get("transformer") or cfg["unet"]
    path, _, family = _pipeline_dir(model)
    with open(os.path.join(path, "transformer" if family == "sd3" else "unet", "config.json")) as f:
        return family, json.load(f)


def check_task(model: str, task: str) -> None:
    """Refuse, before loading, a task the model's architecture cannot run: diffusers' SD 3 inpainting takes a
    transformer with 16 input channels (SD 3's 16-channel latents) or 33 (an inpainting transformer)."""
    family, cfg = denoiser_config(model)
    if family == "sd3" and task == "inpaint" and cfg.get("in_channels") not in (16, 33):
        raise ValueError(f"{model} cannot inpaint: diffusers' SD 3 inpainting pipeline needs a transformer with 16 "
                         f"input channels (SD 3's 16-channel VAE) or 33 (an inpainting transformer), this one has "
                         f"{cfg.get('in_channels')}. Use --image without --mask (img2img), or a U-Net model "
                         f"({', '.join(m for m in TRAINED if m != model)}, sd15, sdxl) for inpainting")


def load_pipeline(model: str, task: str = "text2img", dtype: torch.dtype = torch.float32):
    """`model` is an embedded architecture name (random weights), an embedded trained model (`shapes`,
    `shapes-sd3`) or a local diffusers pipeline directory (never a hub id)."""
    if model in ARCHITECTURES:
        return build_pipeline(model, task, dtype=dtype)
    model, index, family = _pipeline_dir(model)
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
    if family == "sd3":  # SD 3 without T5 (saved as None, so absent from model_index.json): from_pretrained
        kwargs.update({k: None for k in ("text_encoder_3", "tokenizer_3") if not (index.get(k) or [None])[0]})
    pipe = pipeline_class(family, task).from_pretrained(model, dtype=dtype, local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_resolution(arch_or_pipe) -> int:
    if isinstance(arch_or_pipe, str):
        return architecture_config(arch_or_pipe)["resolution"]
    pipe = arch_or_pipe
    denoiser = pipe.__dict__.get("transformer", pipe.__dict__.get("unet"))
    return denoiser.config.sample_size * pipe.vae_scale_factor


def path_and_scale(text: str) -> tuple[str, float]:
    """'FILE[:SCALE]' (a command-line argument, as --lora and --ip-adapter take them) -> (file, scale; 1.0 when
    none is given); a suffix that is not a number belongs to the file name."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def load_ip_adapters(pipe, arguments: list[str]) -> list[tuple[str, float]]:
    """Load IP-Adapter files ('FILE[:SCALE]', as `--ip-adapter` takes them) into a U-Net pipeline with diffusers'
    own pipe.load_ip_adapter, and set their scales. The image encoder (for ip_adapter_image) is read from an
    `image_encoder/` directory beside the first file when there is one (h94/IP-Adapter's layout:
    models/ip-adapter_sd15.safetensors beside models/image_encoder/); without one, calls pass
    ip_adapter_image_embeds. Checks every file before loading any."""
    import math

    specs = [path_and_scale(text) for text in arguments]
    if not specs:
        return []
    if not hasattr(pipe, "load_ip_adapter") or getattr(pipe, "unet", None) is None:
        raise ValueError(f"--ip-adapter: {type(pipe).__name__} takes no IP-Adapter here (dcaccel supports IP-Adapters "
                         "on the U-Net pipelines: SD 1.x/2.x, SDXL and their ControlNet pipelines)")
    for path, scale in specs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--ip-adapter {path}: no such file (an IP-Adapter .safetensors or .bin file)")
        if not path.endswith((".safetensors", ".bin")):
            raise ValueError(f"--ip-adapter {path}: expected a .safetensors or .bin IP-Adapter file")
        if not math.isfinite(scale) or not 0 <= scale <= 10:
            raise ValueError(f"--ip-adapter {path}: the scale must be a number in 0..10, got {scale}")
    first = os.path.dirname(os.path.abspath(specs[0][0]))
    encoder = "image_encoder" if os.path.isdir(os.path.join(first, "image_encoder")) else None
    try:
        pipe.load_ip_adapter([os.path.dirname(os.path.abspath(p)) for p, _ in specs], subfolder=[""] * len(specs),
                             weight_name=[os.path.basename(p) for p, _ in specs], image_encoder_folder=encoder)
    except (KeyError, RuntimeError, OSError) as e:
        raise ValueError(f"--ip-adapter: diffusers could not load {[p for p, _ in specs]} into this "
                         f"{type(pipe.unet).__name__} ({type(e).__name__}: {e}); is it an IP-Adapter for this "
                         "model's architecture?") from e
    pipe.set_ip_adapter_scale([s for _, s in specs])
    return specs
