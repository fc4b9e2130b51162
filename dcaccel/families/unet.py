"""The U-Net family (SD 1.x, 2.x, SDXL): a diffusers UNet2DConditionModel cut at a DeepCache skip branch into
FullUNet / ShallowUNet.

Both are plain nn.Modules (tensors in, tensors out, no hooks, no Python-side state) that share the U-Net's
submodules, so they can be compiled, exported to ONNX or built into engines on their own.

Branch numbering is the reference's `cache_branch_id`: block = branch // 3, layer = branch % 3, with down blocks
counted from the input side and up blocks (and their resnet/attention pairs) counted in reverse. On a cached
step the reference runs the stem, every down block shallower than `block`, the first `layer` pairs of
down_blocks[block], the up pairs of the matching up block with reversed index <= `layer` (and its upsampler),
every shallower up block, and the output head. What those up modules need from the deep part is one tensor:
the hidden state entering the first of them. FullUNet returns it as `feature`; ShallowUNet takes it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import BuildConfig, DeepCacheConfig
from ..graphs.spec import GraphSpec, TensorSpec
from ..graphs.ops import FREEU_KEYS, apply_freeu
from . import ip_adapter
from .base import Family, normalized_config, timestep_input

BRANCHES_PER_BLOCK = 3
SUPPORTED_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
SUPPORTED_MID = ("UNetMidBlock2DCrossAttn",)


def num_branches(unet) -> int:
    """Valid branches are 0 .. num_branches(unet) - 1 (12 for SD 1.5 / 2.1, 9 for SDXL)."""
    check_unet(unet)
    return BRANCHES_PER_BLOCK * len(unet.down_blocks)


def check_unet(unet) -> None:
    """Raise a clear error if `unet` is not a U-Net this split reproduces exactly."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(
            f"unsupported model {type(unet).__name__}: dcaccel splits diffusers' UNet2DConditionModel "
            "(Stable Diffusion 1.x, 2.x and SDXL)"
        )
    cfg = unet.config
    problems = []
    if cfg.class_embed_type is not None:
        problems.append(f"class_embed_type={cfg.class_embed_type!r} (only None)")
    if cfg.addition_embed_type not in (None, "text_time"):
        problems.append(f"addition_embed_type={cfg.addition_embed_type!r} (only None or 'text_time' as in SDXL)")
    problems += ip_adapter.problems(unet)
    down = [type(b).__name__ for b in unet.down_blocks]
    up = [type(b).__name__ for b in unet.up_blocks]
    if any(d not in SUPPORTED_DOWN for d in down):
        problems.append(f"down blocks {down} (supported: {list(SUPPORTED_DOWN)})")
    if any(u not in SUPPORTED_UP for u in up):
        problems.append(f"up blocks {up} (supported: {list(SUPPORTED_UP)})")
    if type(unet.mid_block).__name__ not in SUPPORTED_MID:
        problems.append(f"mid block {type(unet.mid_block).__name__} (supported: {list(SUPPORTED_MID)})")
    if len(unet.down_blocks) != len(unet.up_blocks):
        problems.append("different numbers of down and up blocks")
    for i, block in enumerate(unet.up_blocks):
        if len(block.resnets) != BRANCHES_PER_BLOCK:
            problems.append(
                f"up_blocks[{i}] has {len(block.resnets)} resnets; DeepCache's branch numbering (3 per block) "
                "needs layers_per_block=2, as in SD 1.x, 2.x and SDXL"
            )
            break
    if problems:
        raise ValueError("unsupported UNet2DConditionModel configuration: " + "; ".join(problems))


def freeu_settings(unet) -> dict | None:
    """The FreeU factors set on `unet` ({s1, s2, b1, b2}, as `pipe.enable_freeu` sets them on every up block),
    or None when FreeU is off. Both graphs apply them exactly as diffusers' up blocks do; they are part of what a
    build is for (engines record them, and a change after enable is refitted or refused, never ignored)."""
    per_block = []
    for block in unet.up_blocks:
        values = {k: getattr(block, k, None) for k in FREEU_KEYS}
        per_block.append(values if all(values.values()) else None)  # diffusers' own test: all four truthy
    if all(v is None for v in per_block):
        return None
    first = next(v for v in per_block if v is not None)
    if any(v != first for v in per_block):
        raise ValueError("FreeU factors differ between this U-Net's up blocks; set them with pipe.enable_freeu(s1=, "
                         "s2=, b1=, b2=), which gives every up block the same ones, or pipe.disable_freeu()")
    bad = {k: v for k, v in first.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
    if bad:
        raise ValueError(f"FreeU factors must be numbers, got {bad}")
    return {k: float(v) for k, v in first.items()}


class _Stem(nn.Module):
    """Time (and SDXL added) embedding, and conv_in: what both graphs run first."""

    def __init__(self, unet):
        super().__init__()
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.time_embed_act = unet.time_embed_act
        self.conv_in = unet.conv_in
        self.center_input_sample = bool(unet.config.center_input_sample)
        self.text_time = unet.config.addition_embed_type == "text_time"
        if self.text_time:
            self.add_time_proj = unet.add_time_proj
            self.add_embedding = unet.add_embedding

    def forward(self, sample, timestep, text_embeds=None, time_ids=None, timestep_cond=None):
        """timestep_cond: the guidance embedding of LCM- and guidance-distilled U-Nets (time_cond_proj_dim)."""
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        if timestep.dim() == 0:
            timestep = timestep[None]
        t_emb = self.time_proj(timestep.expand(sample.shape[0])).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb, timestep_cond)
        if self.text_time:
            if text_embeds is None or time_ids is None:
                raise ValueError("this U-Net (addition_embed_type='text_time', SDXL) needs text_embeds and time_ids")
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape((text_embeds.shape[0], -1))
            add_embeds = torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding(add_embeds)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return emb, self.conv_in(sample)


class _Head(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.conv_norm_out = unet.conv_norm_out
        self.conv_act = unet.conv_act
        self.conv_out = unet.conv_out

    def forward(self, h):
        if self.conv_norm_out is not None:
            h = self.conv_act(self.conv_norm_out(h))
        return self.conv_out(h)


def _attend(attn, h, encoder_hidden_states, cross_attention_kwargs=None):
    return attn(h, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                return_dict=False)[0]


class _DownPath(nn.Module):
    """down_blocks[:block] whole, then the first `pairs` resnet/attention pairs of down_blocks[block]."""

    def __init__(self, unet, block: int, pairs: int):
        super().__init__()
        self.blocks = nn.ModuleList(unet.down_blocks[:block])
        partial = unet.down_blocks[block] if block < len(unet.down_blocks) else None
        self.resnets = nn.ModuleList(partial.resnets[:pairs] if partial is not None else [])
        attns = getattr(partial, "attentions", None)
        self.attentions = nn.ModuleList(attns[:pairs]) if attns is not None and pairs else None

    @property
    def num_residuals(self) -> int:
        """How many skip connections this path gives (conv_in's output, then one per resnet and downsampler)."""
        return 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in self.blocks) + len(self.resnets)

    def forward(self, h, emb, encoder_hidden_states, cross_attention_kwargs=None):
        res = [h]
        for block in self.blocks:
            if getattr(block, "has_cross_attention", False):
                h, out = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states,
                               cross_attention_kwargs=cross_attention_kwargs)
            else:
                h, out = block(hidden_states=h, temb=emb)
            res.extend(out)
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions is not None:
                h = _attend(self.attentions[i], h, encoder_hidden_states, cross_attention_kwargs)
            res.append(h)
        return h, res


class _UpPath(nn.Module):
    """up_blocks[block] from resnet `start` on (with its upsampler), then every later up block whole.

    With stop=(block, start) it instead runs up_blocks[:block] whole and the pairs of up_blocks[block] before
    `start`: the deep part of the up path, whose output is the DeepCache feature.
    """

    def __init__(self, unet, block: int, start: int, deep: bool = False, freeu: dict | None = None):
        super().__init__()
        ups = unet.up_blocks
        self.deep = deep
        self.blocks = nn.ModuleList(ups[:block] if deep else ups[block + 1:])
        first = ups[block]
        sl = slice(0, start) if deep else slice(start, None)
        self.resnets = nn.ModuleList(first.resnets[sl])
        attns = getattr(first, "attentions", None)
        self.attentions = nn.ModuleList(attns[sl]) if attns is not None and len(self.resnets) else None
        self.upsamplers = None if deep else first.upsamplers
        # FreeU on the partial block (freeu_settings), applied here as its forward would (the whole blocks apply
        # their own).
        self.freeu = freeu
        self.resolution_idx = block
        # Which up blocks are followed by another (only those get upsample_size), as in UNet2DConditionModel.
        self.final_index = len(ups) - 1
        self.first_index = 0 if deep else block + 1
        self.partial_index = block
        self.num_upsamplers = unet.num_upsamplers

    def _upsample_size(self, res, index, forward_size):
        if forward_size and index != self.final_index:
            return res[-1].shape[2:]
        return None

    def _partial(self, h, emb, res, encoder_hidden_states, forward_size, cross_attention_kwargs=None):
        for i, resnet in enumerate(self.resnets):
            skip = res.pop()
            if self.freeu is not None:  # out of place: h may be the feature, a graph input or output
                h, skip = apply_freeu(self.resolution_idx, h, skip, self.freeu)
            h = resnet(torch.cat([h, skip], dim=1), emb)
            if self.attentions is not None:
                h = _attend(self.attentions[i], h, encoder_hidden_states, cross_attention_kwargs)
        if self.upsamplers is not None:
            size = self._upsample_size(res, self.partial_index, forward_size)
            for upsampler in self.upsamplers:
                h = upsampler(h, size)
        return h

    def _whole(self, h, emb, res, encoder_hidden_states, forward_size, cross_attention_kwargs=None):
        for i, block in enumerate(self.blocks, start=self.first_index):
            n = len(block.resnets)
            block_res = tuple(res[-n:])
            del res[-n:]
            size = self._upsample_size(res, i, forward_size)
            if getattr(block, "has_cross_attention", False):
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=block_res,
                          encoder_hidden_states=encoder_hidden_states, upsample_size=size,
                          cross_attention_kwargs=cross_attention_kwargs)
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=block_res, upsample_size=size)
        return h

    def forward(self, h, emb, res, encoder_hidden_states, forward_size: bool, cross_attention_kwargs=None):
        if self.deep:
            h = self._whole(h, emb, res, encoder_hidden_states, forward_size, cross_attention_kwargs)
            return self._partial(h, emb, res, encoder_hidden_states, forward_size, cross_attention_kwargs)
        h = self._partial(h, emb, res, encoder_hidden_states, forward_size, cross_attention_kwargs)
        return self._whole(h, emb, res, encoder_hidden_states, forward_size, cross_attention_kwargs)


def text_length(pipe) -> int:
    """Text tokens per prompt the U-Net attends to: the tokenizer's model_max_length (the SDXL refiner has only
    tokenizer_2), or, for a pipeline without tokenizers (called with prompt_embeds), its text encoder's
    max_position_embeddings, else CLIP's 77. Eager graphs take any length; static engines check it per call."""
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            return int(tokenizer.model_max_length)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            return int(encoder.config.max_position_embeddings)
    return 77


def _forward_upsample_size(sample, num_upsamplers: int) -> bool:
    factor = 2 ** num_upsamplers
    return any(d % factor != 0 for d in sample.shape[-2:])


def _locate(unet, branch: int):
    n = num_branches(unet)
    if not isinstance(branch, int) or isinstance(branch, bool) or not 0 <= branch < n:
        raise ValueError(f"branch must be an integer in 0..{n - 1} for this U-Net ({len(unet.down_blocks)} blocks), got {branch!r}")
    block, layer = divmod(branch, BRANCHES_PER_BLOCK)
    up_block = len(unet.up_blocks) - 1 - block
    start = len(unet.up_blocks[up_block].resnets) - 1 - layer
    return block, layer, up_block, start


class FullUNet(nn.Module):
    """The whole U-Net; returns (noise prediction, feature), where feature is what ShallowUNet needs."""

    cache_names = ("feature",)

    def __init__(self, unet, branch: int = 0):
        super().__init__()
        block, _, up_block, start = _locate(unet, branch)
        self.branch = branch
        self.graph_settings = graph_settings(unet)
        self.stem = _Stem(unet)
        self.image_cond = ip_adapter.ImageConditioning(unet)
        self.down = _DownPath(unet, len(unet.down_blocks), 0)
        self.mid_block = unet.mid_block
        self.deep_up = _UpPath(unet, up_block, start, deep=True, freeu=self.graph_settings["freeu"])
        self.shallow_up = _UpPath(unet, up_block, start, freeu=self.graph_settings["freeu"])
        self.head = _Head(unet)
        self.num_upsamplers = unet.num_upsamplers

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None,
                down_residuals=None, mid_residual=None, timestep_cond=None, **ip):
        """down_residuals/mid_residual: a ControlNet's, added where UNet2DConditionModel adds them. ip: the
        IP-Adapter inputs (ip_image_embeds_k, ip_adapter_mask_k; see families.ip_adapter)."""
        forward_size = _forward_upsample_size(sample, self.num_upsamplers)
        emb, h = self.stem(sample, timestep, text_embeds, time_ids, timestep_cond)
        cond, kwargs = self.image_cond(encoder_hidden_states, ip)
        h, res = self.down(h, emb, cond, kwargs)
        if down_residuals is not None:
            res = [r + d for r, d in zip(res, down_residuals)]
        h = self.mid_block(h, emb, encoder_hidden_states=cond, cross_attention_kwargs=kwargs)
        if mid_residual is not None:
            h = h + mid_residual
        feature = self.deep_up(h, emb, res, cond, forward_size, kwargs)
        h = self.shallow_up(feature, emb, res, cond, forward_size, kwargs)
        return self.head(h), feature


class ShallowUNet(nn.Module):
    """Only the shallow branch; the deep part comes in as `feature` from an earlier FullUNet call."""

    cache_names = ("feature",)

    def __init__(self, unet, branch: int = 0):
        super().__init__()
        block, layer, up_block, start = _locate(unet, branch)
        self.branch = branch
        self.graph_settings = graph_settings(unet)
        self.stem = _Stem(unet)
        self.image_cond = ip_adapter.ImageConditioning(unet)
        self.down = _DownPath(unet, block, layer)
        self.shallow_up = _UpPath(unet, up_block, start, freeu=self.graph_settings["freeu"])
        self.head = _Head(unet)
        self.num_upsamplers = unet.num_upsamplers

    @property
    def num_residuals(self) -> int:
        """How many skip connections (from the input side) the shallow branch reads."""
        return self.down.num_residuals

    @property
    def uses_encoder_hidden_states(self) -> bool:
        """False when no cross-attention runs on the shallow branch (e.g. SDXL branches 0-2)."""
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        return any(isinstance(m, Transformer2DModel) for m in self.modules())

    def forward(self, sample, timestep, encoder_hidden_states=None, feature=None, text_embeds=None, time_ids=None,
                down_residuals=None, timestep_cond=None, **ip):
        """down_residuals: the first `num_residuals` of a ControlNet's down residuals (the others feed cached
        modules). ip: the IP-Adapter inputs, given only where the shallow branch has cross-attention."""
        forward_size = _forward_upsample_size(sample, self.num_upsamplers)
        emb, h = self.stem(sample, timestep, text_embeds, time_ids, timestep_cond)
        if ip or (self.image_cond.n and encoder_hidden_states is not None):
            cond, kwargs = self.image_cond(encoder_hidden_states, ip)
        else:  # no cross-attention on the shallow branch (SDXL's first branches): no text, no image states
            cond, kwargs = encoder_hidden_states, None
        _, res = self.down(h, emb, cond, kwargs)
        if down_residuals is not None:
            res = [r + d for r, d in zip(res, down_residuals)]
        h = self.shallow_up(feature, emb, res, cond, forward_size, kwargs)
        return self.head(h)


def graph_settings(unet) -> dict:
    """What the graphs compute with besides the weights: FreeU's factors, the IP-Adapters' kinds and scales."""
    settings = {"freeu": freeu_settings(unet)}
    ip = ip_adapter.settings(unet)
    return settings if ip is None else {**settings, "ip_adapter": ip}


def split_unet(unet, branch: int = 0) -> tuple[FullUNet, ShallowUNet]:
    """Cut `unet` at `branch`. Both graphs share the U-Net's weights (no copies)."""
    return FullUNet(unet, branch), ShallowUNet(unet, branch)


def feature_shape(unet, branch: int, batch: int, latent_height: int, latent_width: int) -> tuple[int, int, int, int]:
    """Shape of the feature tensor for a static input shape, from the config alone (no forward pass).

    The feature is concatenated with a skip connection before the first shallow up resnet, so it has that skip's
    spatial size, and the resnet's input channels less the skip's channels.
    """
    _, _, up_block, start = _locate(unet, branch)
    h, w = latent_height, latent_width
    outs = [(unet.conv_in.out_channels, h, w)]
    for block in unet.down_blocks:
        outs += [(r.out_channels, h, w) for r in block.resnets]
        if block.downsamplers is not None:
            h, w = (h + 1) // 2, (w + 1) // 2  # stride-2 conv with padding 1
            outs.append((block.downsamplers[0].out_channels, h, w))
    consumed = sum(len(b.resnets) for b in unet.up_blocks[:up_block]) + start
    skip_c, skip_h, skip_w = outs[len(outs) - 1 - consumed]
    channels = unet.up_blocks[up_block].resnets[start].in_channels - skip_c
    return (batch, channels, skip_h, skip_w)


# -- the family ---------------------------------------------------------------------------------------------------

PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "LatentConsistencyModelPipeline",
    "LatentConsistencyModelImg2ImgPipeline",
)
# U-Net arguments the pipelines pass (as None) that the graphs cannot honour when set.
_UNSUPPORTED_KWARGS = (
    "class_labels", "attention_mask", "down_block_additional_residuals",
    "mid_block_additional_residual", "down_intrablock_additional_residuals", "encoder_attention_mask",
)


def graph_specs(unet, branch: int, build: BuildConfig, vae_scale: int = 8, text_len: int = 77,
                time_ids: int = 6, geometry: dict | None = None) -> dict[str, GraphSpec]:
    """The full and shallow GraphSpecs for `unet` cut at `branch`, at the build's resolution, batch and dtype.
    `time_ids`: SDXL's micro-conditioning values per image (6; 5 for the refiner's aesthetic-score layout).
    `geometry`: the family's (for the IP-Adapter inputs' shapes)."""
    _locate(unet, branch)
    for name in ("height", "width"):
        if getattr(build, name) % vae_scale:
            raise ValueError(f"{name} must be a multiple of the VAE's factor {vae_scale}, got {getattr(build, name)}")
    cfg = unet.config
    b, h, w = build.graph_batch, build.height // vae_scale, build.width // vae_scale
    dt = build.dtype
    inputs = [
        TensorSpec("sample", (b, cfg.in_channels, h, w), dt),
        TensorSpec("timestep", (b,), "float32"),
        TensorSpec("encoder_hidden_states", (b, text_len, cfg.cross_attention_dim), dt),
    ]
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - time_ids * cfg.addition_time_embed_dim
        inputs += [TensorSpec("text_embeds", (b, pooled), dt), TensorSpec("time_ids", (b, time_ids), dt)]
    if cfg.time_cond_proj_dim is not None:  # LCM- and guidance-distilled U-Nets: the guidance embedding
        inputs.append(TensorSpec("timestep_cond", (b, cfg.time_cond_proj_dim), dt))
    ip = ip_adapter.input_specs(geometry or {}, build, b)
    noise = TensorSpec("noise", (b, cfg.out_channels, h, w), dt)
    feature = TensorSpec("feature", feature_shape(unet, branch, b, h, w), dt)
    shallow_inputs = inputs[:2] + [feature] + inputs[3:]
    if ShallowUNet(unet, branch).uses_encoder_hidden_states:
        shallow_inputs.insert(2, inputs[2])
        shallow_inputs += ip
    inputs += ip
    return {
        "full": GraphSpec("full", tuple(inputs), (noise, feature), cache=("feature",)),
        "shallow": GraphSpec("shallow", tuple(shallow_inputs), (noise,), cache=("feature",)),
    }


def check_cross_attention_kwargs(cross_attention_kwargs: dict | None) -> None:
    """The U-Net's per-call cross_attention_kwargs the graphs take: IP-Adapter masks, nothing else."""
    other = sorted(k for k in (cross_attention_kwargs or {}) if k != "ip_adapter_masks")
    if other:
        raise ValueError(f"cross_attention_kwargs {other} are not supported (only 'ip_adapter_masks'): fuse LoRA "
                         "scales into the weights (dcaccel.lora, or pipe.fuse_lora(lora_scale=...)) instead of "
                         "passing them per call")


class UNetFamily(Family):
    name = "unet"
    denoiser_attr = "unet"
    pipelines = PIPELINES
    cut_fields = ("branch",)

    def matches(self, denoiser) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(denoiser, UNet2DConditionModel)

    def check(self, denoiser) -> None:
        check_unet(denoiser)

    def resolve_cut(self, denoiser, config: DeepCacheConfig | BuildConfig) -> dict:
        n = num_branches(denoiser)
        if config.head_blocks is not None or config.tail_blocks is not None:
            raise ValueError(f"head_blocks/tail_blocks cut a transformer; this pipeline's denoiser is a U-Net: give "
                             f"branch (0..{n - 1}, 0 = shallowest and fastest) instead")
        branch = 0 if config.branch is None else config.branch
        if not 0 <= branch < n:
            raise ValueError(f"branch must be in 0..{n - 1} for this U-Net ({n // BRANCHES_PER_BLOCK} blocks), "
                             f"got {branch}")
        return {"branch": branch}

    def split(self, denoiser, cut: dict):
        return split_unet(denoiser, cut["branch"])

    def graph_settings(self, denoiser) -> dict:
        return graph_settings(denoiser)

    def inputs_changed(self, old: dict, new: dict) -> str | None:
        before, after = ((s.get("ip_adapter") or {}).get("adapters", []) for s in (old, new))
        if before != after:
            return f"IP-Adapters {before} -> {after} (pipe.load_ip_adapter / unload_ip_adapter)"
        return None

    def config_dict(self, denoiser) -> dict:
        config = normalized_config(dict(denoiser.config))
        settings = {k: v for k, v in graph_settings(denoiser).items() if v is not None}
        return {**config, **normalized_config(settings)}

    def geometry(self, pipe) -> dict:
        geometry = {"vae_scale_factor": int(pipe.vae_scale_factor), "text_len": text_length(pipe)}
        if getattr(pipe.config, "requires_aesthetics_score", False):  # the SDXL refiner: 5 time ids, not 6
            geometry["time_ids"] = 5
        return {**geometry, **ip_adapter.geometry(pipe, self.denoiser(pipe))}

    def graph_specs(self, denoiser, cut: dict, build: BuildConfig, geometry: dict) -> dict[str, GraphSpec]:
        return graph_specs(denoiser, cut["branch"], build, geometry["vae_scale_factor"], geometry["text_len"],
                           geometry.get("time_ids", 6), geometry)

    def check_call(self, kwargs: dict, runner=None) -> None:
        check_cross_attention_kwargs(kwargs.get("cross_attention_kwargs"))
        specs = getattr(runner, "specs", None)
        if specs is not None:
            masks = (kwargs.get("cross_attention_kwargs") or {}).get("ip_adapter_masks")
            ip_adapter.check_masks(specs, masks is not None, "the DeepCache graphs")

    def call_inputs(self, denoiser, args: tuple, kwargs: dict, wrapper=None) -> dict[str, torch.Tensor]:
        kwargs = dict(kwargs)
        names = ("sample", "timestep", "encoder_hidden_states")
        if len(args) > len(names):
            raise TypeError(f"the U-Net step loop takes at most {len(names)} positional arguments, got {len(args)}")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"U-Net argument {name!r} given twice")
            kwargs[name] = value
        sample, timestep = kwargs.pop("sample"), kwargs.pop("timestep")
        encoder_hidden_states = kwargs.pop("encoder_hidden_states", None)
        cross_attention_kwargs = kwargs.pop("cross_attention_kwargs", None)
        added_cond_kwargs = kwargs.pop("added_cond_kwargs", None)
        timestep_cond = kwargs.pop("timestep_cond", None)
        kwargs.pop("return_dict", None)
        bad = [k for k in kwargs if k not in _UNSUPPORTED_KWARGS]
        if bad:
            raise TypeError(f"unexpected U-Net arguments {bad}")
        used = sorted(k for k in kwargs if kwargs[k] is not None)
        if used:
            raise ValueError(f"dcaccel does not support the U-Net arguments {used} (class labels, attention masks, "
                             "T2I-Adapter residuals); disable DeepCache for such pipelines")
        check_cross_attention_kwargs(cross_attention_kwargs)
        inputs = {"sample": sample, "timestep": timestep_input(timestep, sample.shape[0], sample.device),
                  "encoder_hidden_states": encoder_hidden_states}
        if denoiser.config.addition_embed_type == "text_time":
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise ValueError("an SDXL U-Net needs added_cond_kwargs with text_embeds and time_ids")
            inputs["text_embeds"] = added_cond_kwargs["text_embeds"]
            inputs["time_ids"] = added_cond_kwargs["time_ids"]
        if denoiser.config.time_cond_proj_dim is not None:
            if timestep_cond is None:
                raise ValueError(f"this U-Net is guidance-distilled (time_cond_proj_dim="
                                 f"{denoiser.config.time_cond_proj_dim}) and needs timestep_cond, the guidance "
                                 "embedding its pipeline computes from guidance_scale")
            inputs["timestep_cond"] = timestep_cond
        elif timestep_cond is not None:
            raise ValueError("timestep_cond was given to a U-Net without time_cond_proj_dim (it would be ignored)")
        inputs.update(ip_adapter.call_inputs(denoiser, added_cond_kwargs, cross_attention_kwargs))
        specs = getattr(getattr(wrapper, "runner", None), "specs", None)
        if specs is not None:
            ip_adapter.check_against(specs, inputs, "the DeepCache graphs")
        return inputs

    def output(self, noise: torch.Tensor, return_dict: bool):
        if not return_dict:
            return (noise,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=noise)

    def cut_text(self, cut: dict) -> str:
        return f"branch {cut['branch']}"


FAMILY = UNetFamily()
