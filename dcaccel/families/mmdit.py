"""The MMDiT family (Stable Diffusion 3 / 3.5): diffusers' SD3Transformer2DModel cut into FullMMDiT / ShallowMMDiT.

DeepCache's idea on a transformer: the blocks in the middle of the stack change little between adjacent steps.
A full step runs every block and also returns what the middle blocks `[head, L - tail)` added to the image stream
and to the text stream (the residuals). A cached step runs the embeddings and the first `head` blocks, adds the
cached residuals, and runs the last `tail` blocks, `norm_out` and `proj_out`. This is cache-dit's DBCache with
Fn_compute_blocks=head, Bn_compute_blocks=tail and a static step mask (its residuals are measured and added the
same way, so the outputs are equal), as two static graphs instead of hooks. Differences, on purpose:
  - head_blocks=0 is allowed (cache-dit asserts Fn >= 1): the residual is then taken from the embeddings;
  - head + tail must be below the number of blocks (cache-dit accepts more and then runs some blocks twice);
  - skip-layer guidance (SD 3.5's `skip_guidance_layers`) is its own evaluation, outside the schedule: it runs
    in full (SkipLayerMMDiT, the transformer with the chosen blocks left out, as diffusers runs it), neither
    counted as a step nor reading or writing the cache, because the blocks it leaves out (7-9 on SD 3.5 Medium)
    lie inside the cached middle, whose residual describes them run. Under cache-dit it goes through the cached
    forward and shifts its step count.
The text residual is returned only when a tail block reads the text stream (tail >= 1): the last block of SD3
(`context_pre_only`) gives no text output, so with tail=0 the text stream after the middle blocks is never read.
SD 3.5 Medium's dual-attention blocks need nothing special: they are blocks like the others.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import BuildConfig, DeepCacheConfig, check_int
from ..graphs.spec import GraphSpec, TensorSpec
from .base import Family, timestep_input

PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
# From evidence (benchmarks/quality_sd3.py on the trained shapes-sd3 model, README "Transformer defaults"): the
# fastest setting within one point of prompt accuracy and the paper's relative FID margin of no cache.
DEFAULT_INTERVAL, DEFAULT_HEAD, DEFAULT_TAIL = 2, 0, 1
_REFUSED_KWARGS = ("block_controlnet_hidden_states",)


def num_blocks(transformer) -> int:
    return len(transformer.transformer_blocks)


def check_transformer(transformer) -> None:
    from diffusers import SD3Transformer2DModel

    if not isinstance(transformer, SD3Transformer2DModel):
        raise TypeError(f"unsupported model {type(transformer).__name__}: dcaccel splits diffusers' "
                        "SD3Transformer2DModel (Stable Diffusion 3 and 3.5)")
    if getattr(transformer, "image_proj", None) is not None:
        raise ValueError("this SD3 transformer has an IP-Adapter image projection loaded; unload it before "
                         "dcaccel.enable (IP-Adapters are not supported)")
    if num_blocks(transformer) < 2:
        raise ValueError("an SD3 transformer needs at least 2 blocks to be cut")


def _check_cut(transformer, head: int, tail: int) -> None:
    n = num_blocks(transformer)
    check_int("head_blocks", head, 0)
    check_int("tail_blocks", tail, 0)
    if head + tail >= n:
        raise ValueError(f"head_blocks + tail_blocks must be less than the number of blocks ({n}) so that some "
                         f"blocks are cached, got head_blocks={head}, tail_blocks={tail}")


class _Embed(nn.Module):
    """Patch and position embedding, the time and pooled-text embedding, the context embedder."""

    def __init__(self, transformer):
        super().__init__()
        self.pos_embed = transformer.pos_embed
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        h = self.pos_embed(hidden_states).contiguous()
        temb = self.time_text_embed(timestep, pooled_projections)
        return h, self.context_embedder(encoder_hidden_states), temb


class _Out(nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.norm_out = transformer.norm_out
        self.proj_out = transformer.proj_out
        self.patch_size = transformer.config.patch_size
        self.out_channels = transformer.out_channels

    def forward(self, h, temb, height: int, width: int):
        h = self.proj_out(self.norm_out(h, temb))
        p, c = self.patch_size, self.out_channels
        hp, wp = height // p, width // p
        h = h.reshape(h.shape[0], hp, wp, p, p, c)
        h = torch.einsum("nhwpqc->nchpwq", h)
        return h.reshape(h.shape[0], c, hp * p, wp * p)


def _run(blocks, h, e, temb):
    for block in blocks:
        e, h = block(hidden_states=h, encoder_hidden_states=e, temb=temb, joint_attention_kwargs=None)
    return h, e


class _Split(nn.Module):
    def __init__(self, transformer, head_blocks: int, tail_blocks: int):
        super().__init__()
        check_transformer(transformer)
        _check_cut(transformer, head_blocks, tail_blocks)
        blocks = transformer.transformer_blocks
        n = len(blocks)
        self.head_blocks, self.tail_blocks = head_blocks, tail_blocks
        self.embed = _Embed(transformer)
        self.head = nn.ModuleList(blocks[:head_blocks])
        self.tail = nn.ModuleList(blocks[n - tail_blocks:])
        self.out = _Out(transformer)
        self.cache_names = ("feature_image", "feature_text") if tail_blocks else ("feature_image",)


class FullMMDiT(_Split):
    """Every block; returns (noise prediction, feature): the residuals the middle blocks added to the image
    stream, and (tail >= 1) to the text stream."""

    def __init__(self, transformer, head_blocks: int = DEFAULT_HEAD, tail_blocks: int = DEFAULT_TAIL):
        super().__init__(transformer, head_blocks, tail_blocks)
        n = num_blocks(transformer)
        self.middle = nn.ModuleList(transformer.transformer_blocks[head_blocks:n - tail_blocks])

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        height, width = hidden_states.shape[-2:]
        h, e, temb = self.embed(hidden_states, timestep, encoder_hidden_states, pooled_projections)
        h_head, e_head = _run(self.head, h, e, temb)
        h, e = _run(self.middle, h_head, e_head, temb)
        feature = h - h_head
        if self.tail_blocks:
            feature = (feature, e - e_head)
        h, e = _run(self.tail, h, e, temb)
        return self.out(h, temb, height, width), feature


class ShallowMMDiT(_Split):
    """The embeddings, the head blocks, the cached residuals, the tail blocks and the output."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, feature=None):
        height, width = hidden_states.shape[-2:]
        h, e, temb = self.embed(hidden_states, timestep, encoder_hidden_states, pooled_projections)
        h, e = _run(self.head, h, e, temb)
        if self.tail_blocks:
            residual_h, residual_e = feature
            h, e = residual_h + h, residual_e + e
        else:
            h = feature + h
        h, e = _run(self.tail, h, e, temb)
        return self.out(h, temb, height, width)


class ProbeMMDiT(nn.Module):
    """schedule='dynamic': the embeddings and the first max(1, head_blocks) blocks; returns what those blocks
    added to the image stream (cache-dit's Fn residual)."""

    input_names = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")

    def __init__(self, transformer, head_blocks: int):
        super().__init__()
        self.embed = _Embed(transformer)
        self.blocks = nn.ModuleList(transformer.transformer_blocks[:max(1, head_blocks)])

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        h, e, temb = self.embed(hidden_states, timestep, encoder_hidden_states, pooled_projections)
        out, _ = _run(self.blocks, h, e, temb)
        return out - h


class SkipLayerMMDiT(nn.Module):
    """Skip-layer guidance's evaluation: the whole transformer with the blocks `skip_layers` left out, exactly as
    diffusers' SD3Transformer2DModel runs it for `skip_layers=` (tensors in, noise out; the skipped blocks are
    fixed, so the graph is static)."""

    input_names = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")

    def __init__(self, transformer, skip_layers: tuple[int, ...]):
        super().__init__()
        self.transformer = transformer
        self.skip_layers = list(skip_layers)

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        return self.transformer(hidden_states=hidden_states, timestep=timestep,
                                encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                                skip_layers=self.skip_layers, return_dict=False)[0]


def split_transformer(transformer, head_blocks: int = DEFAULT_HEAD, tail_blocks: int = DEFAULT_TAIL):
    """Cut an SD3 transformer: (full, shallow), sharing its weights (no copies). head_blocks and tail_blocks are
    integers >= 0 with head_blocks + tail_blocks below the number of blocks (the graphs check them, as
    DeepCacheConfig does)."""
    return FullMMDiT(transformer, head_blocks, tail_blocks), ShallowMMDiT(transformer, head_blocks, tail_blocks)


def graph_specs(transformer, head_blocks: int, tail_blocks: int, build: BuildConfig, vae_scale: int,
                text_len: int) -> dict[str, GraphSpec]:
    _check_cut(transformer, head_blocks, tail_blocks)
    cfg = transformer.config
    factor = vae_scale * cfg.patch_size
    for name in ("height", "width"):
        if getattr(build, name) % factor:
            raise ValueError(f"{name} must be a multiple of {factor} (VAE factor {vae_scale} x patch size "
                             f"{cfg.patch_size}) for this transformer, got {getattr(build, name)}")
    b, h, w = build.graph_batch, build.height // vae_scale, build.width // vae_scale
    if max(h, w) // cfg.patch_size > cfg.pos_embed_max_size:
        raise ValueError(f"{build.height}x{build.width} is too large for this transformer: at most "
                         f"{cfg.pos_embed_max_size * factor} pixels a side (pos_embed_max_size)")
    dt, inner = build.dtype, cfg.num_attention_heads * cfg.attention_head_dim
    inputs = (
        TensorSpec("hidden_states", (b, cfg.in_channels, h, w), dt),
        TensorSpec("timestep", (b,), "float32"),
        TensorSpec("encoder_hidden_states", (b, text_len, cfg.joint_attention_dim), dt),
        TensorSpec("pooled_projections", (b, cfg.pooled_projection_dim), dt),
    )
    cache = [TensorSpec("feature_image", (b, (h // cfg.patch_size) * (w // cfg.patch_size), inner), dt)]
    if tail_blocks:
        cache.append(TensorSpec("feature_text", (b, text_len, inner), dt))
    names = tuple(t.name for t in cache)
    noise = TensorSpec("noise", (b, cfg.out_channels, h, w), dt)
    return {"full": GraphSpec("full", inputs, (noise, *cache), cache=names),
            "shallow": GraphSpec("shallow", inputs + tuple(cache), (noise,), cache=names)}


class MMDiTFamily(Family):
    name = "mmdit"
    denoiser_attr = "transformer"
    pipelines = PIPELINES
    cut_fields = ("head_blocks", "tail_blocks")
    default_interval = DEFAULT_INTERVAL

    def probe(self, denoiser, cut: dict):
        return ProbeMMDiT(denoiser, cut["head_blocks"])

    def matches(self, denoiser) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(denoiser, SD3Transformer2DModel)

    def check(self, denoiser) -> None:
        check_transformer(denoiser)

    def resolve_cut(self, denoiser, config: DeepCacheConfig | BuildConfig) -> dict:
        n = num_blocks(denoiser)
        if config.branch is not None:
            raise ValueError(f"branch cuts a U-Net; this pipeline's denoiser is an SD3 transformer ({n} blocks): give "
                             f"head_blocks and tail_blocks (>= 0, head_blocks + tail_blocks < {n}) instead")
        head = DEFAULT_HEAD if config.head_blocks is None else config.head_blocks
        tail = DEFAULT_TAIL if config.tail_blocks is None else config.tail_blocks
        _check_cut(denoiser, head, tail)
        return {"head_blocks": head, "tail_blocks": tail}

    def split(self, denoiser, cut: dict):
        return split_transformer(denoiser, cut["head_blocks"], cut["tail_blocks"])

    def geometry(self, pipe) -> dict:
        # SD 3 conditions on the CLIP tokens (77) followed by the T5 tokens (max_sequence_length, 256 by default;
        # zeros when text_encoder_3 is None): the engines are built for the pipeline's default length.
        return {"vae_scale_factor": int(pipe.vae_scale_factor),
                "text_len": int(pipe.tokenizer_max_length) + int(_default_max_sequence_length(pipe))}

    def graph_specs(self, denoiser, cut: dict, build: BuildConfig, geometry: dict) -> dict[str, GraphSpec]:
        return graph_specs(denoiser, cut["head_blocks"], cut["tail_blocks"], build, geometry["vae_scale_factor"],
                           geometry["text_len"])

    def check_call(self, kwargs: dict, runner=None) -> None:
        layers = kwargs.get("skip_guidance_layers")
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(f"skip_guidance_layers must be a list of block indices (ints), got {layers!r}")
            if runner is not None and not hasattr(runner, "run_extra"):
                raise ValueError(
                    "skip_guidance_layers (skip-layer guidance) runs an extra evaluation with some blocks left out, "
                    "in PyTorch: supported on the eager and torch_compile backends; this pipeline runs ONNX Runtime "
                    "or TensorRT engines, which have no skip-layer graph. Call without it, or enable the pipeline on "
                    "backend='eager' or 'torch_compile'")
        if kwargs.get("joint_attention_kwargs"):
            raise ValueError(f"joint_attention_kwargs {sorted(kwargs['joint_attention_kwargs'])} are not supported: "
                             "fuse LoRA scales into the weights (dcaccel.lora) instead of passing them per call")

    def call_inputs(self, denoiser, args: tuple, kwargs: dict, wrapper=None) -> dict[str, torch.Tensor]:
        names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
        kwargs = dict(kwargs)
        if len(args) > len(names):
            raise TypeError(f"the transformer step loop takes at most {len(names)} positional arguments")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"transformer argument {name!r} given twice")
            kwargs[name] = value
        joint = kwargs.pop("joint_attention_kwargs", None)
        kwargs.pop("return_dict", None)
        skip_layers = kwargs.pop("skip_layers", None)
        used = sorted(k for k in _REFUSED_KWARGS if kwargs.pop(k, None) is not None)
        if used:
            raise ValueError(f"dcaccel does not support the transformer arguments {used} (SD3 ControlNet); disable "
                             "DeepCache for such pipelines")
        if joint:
            raise ValueError(f"joint_attention_kwargs {sorted(joint)} are not supported: fuse LoRA scales into the "
                             "weights (dcaccel.lora) instead of passing them per call")
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"unexpected transformer arguments {unknown}")
        missing = [n for n in names if kwargs.get(n) is None]
        if missing:
            raise ValueError(f"the SD3 transformer step loop needs {missing}")
        h = kwargs["hidden_states"]
        inputs = {"hidden_states": h, "timestep": timestep_input(kwargs["timestep"], h.shape[0], h.device),
                  "encoder_hidden_states": kwargs["encoder_hidden_states"],
                  "pooled_projections": kwargs["pooled_projections"]}
        if skip_layers is not None:  # skip-layer guidance: an evaluation outside the schedule (see the docstring)
            key = ("skip_layers", tuple(int(i) for i in skip_layers))
            inputs["extra"] = (key, lambda: SkipLayerMMDiT(denoiser, key[1]))
        return inputs

    def output(self, noise: torch.Tensor, return_dict: bool):
        if not return_dict:
            return (noise,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=noise)

    def cut_text(self, cut: dict) -> str:
        return f"head {cut['head_blocks']}, tail {cut['tail_blocks']} blocks"


def _default_max_sequence_length(pipe) -> int:
    import inspect

    for cls in type(pipe).__mro__:
        call = vars(cls).get("__call__")
        if call is not None:
            param = inspect.signature(call).parameters.get("max_sequence_length")
            if param is not None:
                return param.default
    return 256


FAMILY = MMDiTFamily()
