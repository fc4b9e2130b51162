"""U-Nets with ControlNets (SD 1.x/2.x and SDXL ControlNet pipelines): the ControlNet cut at the same branch.

A ControlNet adds residuals to the U-Net's skip connections and to its mid block. On a cached step only the skip
connections the shallow branch reads matter (the mid block and the deeper ones feed the cached part), and those
are the ControlNet's first residuals, which come from its first layers alone. So the full graph runs every
ControlNet whole and the whole U-Net; the shallow graph runs each ControlNet's first layers (up to the residuals
the shallow U-Net reads) and the shallow U-Net. Both equal DeepCache with the whole ControlNet run on every step
(`DeepCacheConfig(cut_controlnet=False)` runs it whole in the shallow graph too, for comparison).

Each graph holds the ControlNets and the U-Net together (one graph, not one per model): a step is then one call
of one graph on every backend, with no host round trip between ControlNet and U-Net, and the engine layer keeps
its two graphs per engine. The pipeline still calls `pipe.controlnet` and then `pipe.unet` each step: while
DeepCache is enabled the ControlNet's call only hands its inputs to the step loop (and returns placeholders the
pipeline passes on untouched), and the U-Net call runs the graph with both.

Graph inputs, besides the U-Net's: `control_sample` (the ControlNet's latents: half the batch in guess mode with
classifier-free guidance), `control_encoder_hidden_states` (and for SDXL `control_text_embeds`,
`control_time_ids`), and per ControlNet k: `control_cond_k` (its conditioning image) and `control_scales_k`, one
multiplier per residual (the conditioning scale, times guess mode's logspace ramp, times the guidance window's
keep factor: so guess mode and control_guidance_start/end change values, not graphs).
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from ..config import BuildConfig, DeepCacheConfig
from ..graphs.spec import GraphSpec, TensorSpec
from . import ip_adapter
from . import unet as unet_family
from .base import RELEASED, Family, normalized_config, timestep_input
from .unet import BRANCHES_PER_BLOCK, FullUNet, ShallowUNet, _DownPath, check_unet

PIPELINES = (
    "StableDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusionXLControlNetInpaintPipeline",
)


def controlnets_of(controlnet) -> list:
    """The ControlNetModels behind a pipeline's `controlnet` (one, or a MultiControlNetModel's nets)."""
    return list(controlnet.nets) if hasattr(controlnet, "nets") else [controlnet]


class ControlledUNet(nn.Module):
    """A U-Net and its ControlNets as one model: what is checked, hashed, keyed and cut. Attributes the pipeline
    reads (config, dtype, ...) are the U-Net's."""

    def __init__(self, unet, controlnets):
        super().__init__()
        self.unet = unet
        self.controlnets = nn.ModuleList(controlnets)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)


def check_model(model: ControlledUNet) -> None:
    from diffusers import ControlNetModel

    check_unet(model.unet)
    for i, cn in enumerate(model.controlnets):
        if not isinstance(cn, ControlNetModel):
            raise TypeError(f"controlnet {i} is a {type(cn).__name__}; dcaccel cuts diffusers' ControlNetModel")
        cfg, ucfg = cn.config, model.unet.config
        problems = []
        if cfg.class_embed_type is not None or cfg.addition_embed_type not in (None, "text_time"):
            problems.append("class or addition embeddings other than SDXL's")
        if getattr(cn, "encoder_hid_proj", None) is not None:
            problems.append("encoder_hid_proj")
        if list(cfg.block_out_channels) != list(ucfg.block_out_channels) or \
                list(cfg.down_block_types) != list(ucfg.down_block_types) or \
                cfg.layers_per_block != ucfg.layers_per_block or cfg.cross_attention_dim != ucfg.cross_attention_dim \
                or cfg.addition_embed_type != ucfg.addition_embed_type:
            problems.append(f"its down blocks {list(cfg.down_block_types)} x {list(cfg.block_out_channels)} "
                            f"(cross-attention {cfg.cross_attention_dim}) are not the U-Net's "
                            f"{list(ucfg.down_block_types)} x {list(ucfg.block_out_channels)} "
                            f"(cross-attention {ucfg.cross_attention_dim}): a ControlNet for another architecture")
        if problems:
            raise ValueError(f"controlnet {i} cannot be used with this U-Net: " + "; ".join(problems))


class _ControlStem(nn.Module):
    """What ControlNetModel.forward runs before its down blocks: embeddings, conv_in, the condition embedding."""

    def __init__(self, cn):
        super().__init__()
        self.time_proj, self.time_embedding, self.conv_in = cn.time_proj, cn.time_embedding, cn.conv_in
        self.cond_embedding = cn.controlnet_cond_embedding
        self.bgr = cn.config.controlnet_conditioning_channel_order == "bgr"
        self.text_time = cn.config.addition_embed_type == "text_time"
        if self.text_time:
            self.add_time_proj, self.add_embedding = cn.add_time_proj, cn.add_embedding

    def forward(self, sample, timestep, cond, text_embeds=None, time_ids=None):
        if self.bgr:
            cond = torch.flip(cond, dims=[1])
        emb = self.time_embedding(self.time_proj(timestep.expand(sample.shape[0])).to(dtype=sample.dtype), None)
        if self.text_time:
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape((text_embeds.shape[0], -1))
            emb = emb + self.add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        return emb, self.conv_in(sample) + self.cond_embedding(cond)


class ControlNetGraph(nn.Module):
    """One ControlNet: all its residuals (full=True), or only the first `count` (its first layers alone).
    Returns (down residuals, mid residual or None), scaled per residual by `scales` (and mean-pooled for
    global_pool_conditions ControlNets), as ControlNetModel.forward computes them."""

    def __init__(self, cn, block: int, layer: int, full: bool):
        super().__init__()
        self.stem = _ControlStem(cn)
        self.full = full
        n_blocks = len(cn.down_blocks)
        self.down = _DownPath(cn, n_blocks if full else block, 0 if full else layer)
        self.mid_block = cn.mid_block if full else None
        self.count = len(cn.controlnet_down_blocks) if full else self.down.num_residuals
        self.zero_convs = nn.ModuleList(cn.controlnet_down_blocks[:self.count])
        self.zero_mid = cn.controlnet_mid_block if full else None
        self.pool = bool(cn.config.global_pool_conditions)

    def forward(self, sample, timestep, encoder_hidden_states, cond, scales, text_embeds=None, time_ids=None):
        emb, h = self.stem(sample, timestep, cond, text_embeds, time_ids)
        h, res = self.down(h, emb, encoder_hidden_states)
        scales = scales.to(h.dtype)
        down = [conv(r) * scales[i] for i, (conv, r) in enumerate(zip(self.zero_convs, res))]
        mid = None
        if self.full:
            h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
            mid = self.zero_mid(h) * scales[-1]
        if self.pool:
            down = [torch.mean(d, dim=(2, 3), keepdim=True) for d in down]
            mid = None if mid is None else torch.mean(mid, dim=(2, 3), keepdim=True)
        return down, mid


def _control_residuals(graphs, batch: int, inputs: dict):
    """Every ControlNet's residuals, summed as MultiControlNetModel does, padded with zeros for the
    unconditional half when the ControlNets saw only the conditional one (guess mode)."""
    down, mid = None, None
    t = inputs["timestep"][: inputs["control_sample"].shape[0]]
    for k, graph in enumerate(graphs):
        d, m = graph(inputs["control_sample"], t, inputs["control_encoder_hidden_states"], inputs[f"control_cond_{k}"],
                     inputs[f"control_scales_{k}"], inputs.get("control_text_embeds"), inputs.get("control_time_ids"))
        down = d if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else (mid + m if m is not None else None)
    if inputs["control_sample"].shape[0] < batch:
        down = [torch.cat([torch.zeros_like(x), x]) for x in down]
        mid = None if mid is None else torch.cat([torch.zeros_like(mid), mid])
    return down, mid


class FullControlled(nn.Module):
    cache_names = ("feature",)

    @property
    def graph_settings(self) -> dict:
        """The U-Net's (FreeU, IP-Adapter scales): what torch_compile's refit compares."""
        return self.unet.graph_settings

    def __init__(self, model: ControlledUNet, branch: int):
        super().__init__()
        block, layer = divmod(branch, BRANCHES_PER_BLOCK)
        self.unet = FullUNet(model.unet, branch)
        self.controlnets = nn.ModuleList(ControlNetGraph(cn, block, layer, full=True) for cn in model.controlnets)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None,
                **control):
        inputs = {"timestep": timestep, **control}
        down, mid = _control_residuals(self.controlnets, sample.shape[0], inputs)
        return self.unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids, down_residuals=down,
                         mid_residual=mid, timestep_cond=timestep_cond, **ip_adapter.ip_inputs(control))


class ShallowControlled(nn.Module):
    cache_names = ("feature",)

    @property
    def graph_settings(self) -> dict:
        return self.unet.graph_settings

    def __init__(self, model: ControlledUNet, branch: int, cut_controlnet: bool = True):
        super().__init__()
        block, layer = divmod(branch, BRANCHES_PER_BLOCK)
        self.unet = ShallowUNet(model.unet, branch)
        self.unet_reads_text = self.unet.uses_encoder_hidden_states
        self.controlnets = nn.ModuleList(ControlNetGraph(cn, block, layer, full=not cut_controlnet)
                                         for cn in model.controlnets)

    @property
    def uses_encoder_hidden_states(self) -> bool:
        return True  # the ControlNets read the prompt (the U-Net's own shallow part may not)

    def forward(self, sample, timestep, encoder_hidden_states=None, feature=None, text_embeds=None, time_ids=None,
                timestep_cond=None, **control):
        inputs = {"timestep": timestep, **control}
        down, _ = _control_residuals(self.controlnets, sample.shape[0], inputs)
        n = self.unet.num_residuals
        return self.unet(sample, timestep, encoder_hidden_states if self.unet_reads_text else None, feature,
                         text_embeds, time_ids, down_residuals=down[:n], timestep_cond=timestep_cond,
                         **ip_adapter.ip_inputs(control))


def split_controlled(model: ControlledUNet, branch: int = 0, cut_controlnet: bool = True):
    return FullControlled(model, branch), ShallowControlled(model, branch, cut_controlnet)


def residual_count(cn) -> int:
    return len(cn.controlnet_down_blocks)


def cond_factor(cn) -> int:
    """How much larger than the latents a ControlNet's conditioning image is (its embedding's downsampling)."""
    return 2 ** (len(cn.config.conditioning_embedding_out_channels) - 1)


def graph_specs(model: ControlledUNet, branch: int, build: BuildConfig, vae_scale: int, text_len: int,
                time_ids: int = 6, geometry: dict | None = None) -> dict[str, GraphSpec]:
    specs = unet_family.graph_specs(model.unet, branch, build, vae_scale, text_len, time_ids, geometry)
    full, shallow = specs["full"], specs["shallow"]
    b = build.graph_batch
    bc = b // 2 if build.guess_mode and build.cfg else b
    h, w, dt = build.height // vae_scale, build.width // vae_scale, build.dtype
    cn0 = model.controlnets[0].config
    control = [TensorSpec("control_sample", (bc, cn0.in_channels, h, w), dt),
               TensorSpec("control_encoder_hidden_states", (bc, text_len, cn0.cross_attention_dim), dt)]
    if cn0.addition_embed_type == "text_time":
        pooled = cn0.projection_class_embeddings_input_dim - time_ids * cn0.addition_time_embed_dim
        control += [TensorSpec("control_text_embeds", (bc, pooled), dt),
                    TensorSpec("control_time_ids", (bc, time_ids), dt)]
    for k, cn in enumerate(model.controlnets):
        control += [TensorSpec(f"control_cond_{k}", (bc, cn.config.conditioning_channels, build.height,
                                                     build.width), dt),
                    TensorSpec(f"control_scales_{k}", (residual_count(cn) + 1,), "float32")]
    shallow_inputs = list(shallow.inputs)
    if not any(t.name == "encoder_hidden_states" for t in shallow_inputs):
        shallow_inputs.insert(2, full.inputs[2])
    return {"full": GraphSpec("full", full.inputs + tuple(control), full.outputs, cache=full.cache),
            "shallow": GraphSpec("shallow", tuple(shallow_inputs) + tuple(control), shallow.outputs,
                                 cache=shallow.cache)}


class _Placeholders:
    """Zero tensors the pipeline passes from the ControlNet's call to the U-Net's: allocated once per shape."""

    def __init__(self):
        self._cache = {}

    def get(self, shape, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(shape), like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self._cache[key]


class ControlNetFamily(Family):
    name = "controlnet"
    denoiser_attr = "unet"
    pipelines = PIPELINES
    cut_fields = ("branch",)

    def matches(self, denoiser) -> bool:
        return isinstance(denoiser, ControlledUNet)

    def denoiser(self, pipe):
        return ControlledUNet(pipe.unet, controlnets_of(pipe.controlnet))

    def check(self, denoiser) -> None:
        check_model(denoiser)

    def resolve_cut(self, denoiser, config: DeepCacheConfig | BuildConfig) -> dict:
        cut = unet_family.FAMILY.resolve_cut(denoiser.unet, config)
        return {**cut, "cut_controlnet": bool(getattr(config, "cut_controlnet", True))}

    def split(self, denoiser, cut: dict):
        return split_controlled(denoiser, cut["branch"], cut["cut_controlnet"])

    def geometry(self, pipe) -> dict:
        geometry = unet_family.FAMILY.geometry(pipe)
        for k, cn in enumerate(controlnets_of(pipe.controlnet)):
            if cond_factor(cn) != geometry["vae_scale_factor"]:
                raise ValueError(f"controlnet {k} takes images {cond_factor(cn)}x its latents, this pipeline's VAE "
                                 f"scales by {geometry['vae_scale_factor']}: a ControlNet for another architecture")
        return geometry

    def graph_specs(self, denoiser, cut: dict, build: BuildConfig, geometry: dict) -> dict[str, GraphSpec]:
        return graph_specs(denoiser, cut["branch"], build, geometry["vae_scale_factor"], geometry["text_len"],
                           geometry.get("time_ids", 6), geometry)

    def config_dict(self, denoiser) -> dict:
        return {"unet": unet_family.FAMILY.config_dict(denoiser.unet),
                "controlnets": [normalized_config(dict(cn.config)) for cn in denoiser.controlnets]}

    def graph_settings(self, denoiser) -> dict:
        return unet_family.FAMILY.graph_settings(denoiser.unet)

    def inputs_changed(self, old: dict, new: dict) -> str | None:
        return unet_family.FAMILY.inputs_changed(old, new)

    def check_call(self, kwargs: dict, runner=None) -> None:
        unet_family.FAMILY.check_call(kwargs, runner)

    def attach_extras(self, pipe, wrapper):
        """Give pipe.controlnet a class whose call hands its inputs to the step loop (and the original back at
        disable)."""
        cn = pipe.controlnet
        original = type(cn)
        placeholders = _Placeholders()
        model = wrapper.denoiser

        def forward(self, sample, timestep, encoder_hidden_states=None, controlnet_cond=None,
                    conditioning_scale=1.0, guess_mode=False, added_cond_kwargs=None, return_dict=True, **kwargs):
            if wrapper._detached or wrapper._owner_thread != threading.get_ident():
                # not inside the enabled pipeline's call (a pipeline made from pipe.components, another thread):
                # the ControlNet itself
                if getattr(self, RELEASED, False):
                    raise RuntimeError("this ControlNet's weights were released by dcaccel.enable(..., "
                                       "release_weights=True) (an engine held the only copy); it runs only inside "
                                       "the enabled pipeline's calls")
                return original.forward(self, sample, timestep, encoder_hidden_states, controlnet_cond,
                                        conditioning_scale, guess_mode=guess_mode,
                                        added_cond_kwargs=added_cond_kwargs, return_dict=return_dict, **kwargs)
            wrapper.pending_control = _control_inputs(model, sample, encoder_hidden_states, controlnet_cond,
                                                      conditioning_scale, guess_mode, added_cond_kwargs, kwargs)
            down = [placeholders.get((sample.shape[0], 1, 1, 1), sample)] * residual_count(model.controlnets[0])
            return down, placeholders.get((sample.shape[0], 1, 1, 1), sample)

        cls = type(original.__name__, (original,), {"forward": forward, "__module__": original.__module__,
                                                    "_dcaccel_hands_over": True})
        cn.__class__ = cls

        def restore():
            cn.__class__ = original

        return restore

    def call_inputs(self, denoiser, args: tuple, kwargs: dict, wrapper=None) -> dict[str, torch.Tensor]:
        """The U-Net's inputs, and the ControlNets' inputs their call handed over just before."""
        kwargs = dict(kwargs)
        kwargs.pop("down_block_additional_residuals", None)
        kwargs.pop("mid_block_additional_residual", None)
        inputs = unet_family.FAMILY.call_inputs(denoiser.unet, args, kwargs, wrapper)
        control = getattr(wrapper, "pending_control", None)
        if control is None:
            raise RuntimeError("the U-Net of a ControlNet pipeline was called without its ControlNet's call first; "
                               "dcaccel follows the diffusers ControlNet pipelines' order (ControlNet, then U-Net)")
        wrapper.pending_control = None
        inputs.update(control)
        return inputs

    def output(self, noise: torch.Tensor, return_dict: bool):
        return unet_family.FAMILY.output(noise, return_dict)

    def cut_text(self, cut: dict) -> str:
        return f"branch {cut['branch']}" + ("" if cut["cut_controlnet"] else ", whole ControlNet on cached steps")


def _control_inputs(model, sample, encoder_hidden_states, controlnet_cond, conditioning_scale, guess_mode,
                    added_cond_kwargs, extra: dict) -> dict:
    used = sorted(k for k, v in extra.items() if v is not None and k not in ("cross_attention_kwargs",))
    if used:
        raise ValueError(f"dcaccel does not support the ControlNet arguments {used}")
    if extra.get("cross_attention_kwargs"):
        raise ValueError("cross_attention_kwargs are not supported: fuse LoRA scales into the weights")
    nets = model.controlnets
    conds = controlnet_cond if isinstance(controlnet_cond, (list, tuple)) else [controlnet_cond]
    scales = conditioning_scale if isinstance(conditioning_scale, (list, tuple)) else [conditioning_scale]
    if len(conds) != len(nets) or len(scales) != len(nets):
        raise ValueError(f"{len(nets)} ControlNets, but {len(conds)} control images and {len(scales)} scales")
    inputs = {"control_sample": sample, "control_encoder_hidden_states": encoder_hidden_states}
    if added_cond_kwargs:
        inputs["control_text_embeds"] = added_cond_kwargs["text_embeds"]
        inputs["control_time_ids"] = added_cond_kwargs["time_ids"]
    for k, (cn, cond, scale) in enumerate(zip(nets, conds, scales)):
        n = residual_count(cn)
        factor = cond_factor(cn)
        if tuple(cond.shape[-2:]) != tuple(d * factor for d in sample.shape[-2:]):
            raise ValueError(f"control image {k} is {tuple(cond.shape[-2:])} pixels; for latents of "
                             f"{tuple(sample.shape[-2:])} this ControlNet needs {tuple(d * factor for d in sample.shape[-2:])}"
                             " (the pipeline's height and width)")
        if cond.shape[0] != sample.shape[0]:
            raise ValueError(f"control image {k} has batch {cond.shape[0]}, the ControlNet's latents {sample.shape[0]}")
        if guess_mode and not cn.config.global_pool_conditions:
            ramp = torch.logspace(-1, 0, n + 1, device=sample.device) * float(scale)
        else:
            ramp = torch.full((n + 1,), float(scale), device=sample.device)
        inputs[f"control_cond_{k}"] = cond
        inputs[f"control_scales_{k}"] = ramp.to(torch.float32)
    return inputs


FAMILY = ControlNetFamily()
