"""IP-Adapter on U-Nets (SD 1.x/2.x, SDXL, and their ControlNet pipelines), as graph inputs of both graphs.

diffusers' `pipe.load_ip_adapter` gives the U-Net an image projection per adapter (`encoder_hid_proj`, a
MultiIPAdapterImageProjection) and IP-Adapter attention processors (extra keys and values per adapter, and a scale
per adapter that `pipe.set_ip_adapter_scale` sets). Each call, the pipeline passes the image embeddings in
`added_cond_kwargs["image_embeds"]` (one tensor per adapter, (batch, images, ...)) and, for masked adapters,
`cross_attention_kwargs["ip_adapter_masks"]` (one (1, images, height, width) tensor per adapter).

Here both graphs take them as inputs named `ip_image_embeds_{k}` and `ip_adapter_mask_{k}`, run the projection
themselves, and hand the attention modules what UNet2DConditionModel hands them: (text states, projected image
states) and the masks. The adapters' weights are the U-Net's (in its state dict, so in every engine's weights
hash); their scales are graph settings (graph_settings): eager and torch_compile graphs follow a change, engines
refuse one. Masks change what the attention computes, not only values, so graphs are made with or without mask
inputs (`ip_adapter_masks=` at enable or build), and a call that does not fit them is refused before it runs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graphs.spec import TensorSpec

EMBEDS = "ip_image_embeds_{}"
MASKS = "ip_adapter_mask_{}"
CLIP = "ip_clip_embeds_{}"  # FaceID Plus: the CLIP image states users set on its projection (`clip_embeds`) per call
EMBEDS_PREFIX, MASKS_PREFIX, CLIP_PREFIX = (name.removesuffix("{}") for name in (EMBEDS, MASKS, CLIP))


def ip_inputs(inputs: dict) -> dict:
    """The IP-Adapter inputs among a graph's keyword inputs."""
    return {k: v for k, v in inputs.items() if k.startswith((EMBEDS_PREFIX, MASKS_PREFIX, CLIP_PREFIX))}
# Image projections whose input is one embedding per image, and those that take a sequence (CLIP hidden states).
POOLED = ("ImageProjection", "IPAdapterFaceIDImageProjection")
SEQUENCE = ("IPAdapterPlusImageProjection", "IPAdapterFullImageProjection")
FACEID_PLUS = "IPAdapterFaceIDPlusImageProjection"  # ID embeddings in; CLIP image states from its clip_embeds
PROCESSORS = ("IPAdapterAttnProcessor", "IPAdapterAttnProcessor2_0")
CLIP_TOKENS = 257  # CLIP ViT-H/14 and ViT-bigG/14 at 224 px: 16 x 16 patches and the class token


def layers(unet) -> list[nn.Module]:
    """The image projections of the adapters loaded on `unet` (empty without IP-Adapter)."""
    proj = getattr(unet, "encoder_hid_proj", None)
    if proj is None or getattr(unet.config, "encoder_hid_dim_type", None) != "ip_image_proj":
        return []
    return list(proj.image_projection_layers)


def problems(unet) -> list[str]:
    """What about `unet`'s IP-Adapters the graphs cannot reproduce (empty when they can, or none is loaded)."""
    proj = getattr(unet, "encoder_hid_proj", None)
    if proj is None:
        return []
    if getattr(unet.config, "encoder_hid_dim_type", None) != "ip_image_proj":
        return [f"encoder_hid_proj for encoder_hid_dim_type={unet.config.encoder_hid_dim_type!r} (only IP-Adapter's "
                "'ip_image_proj')"]
    out = []
    if getattr(unet, "text_encoder_hid_proj", None) is not None:
        out.append("a text projection under the IP-Adapter (text_encoder_hid_proj, Kolors' layout)")
    kinds = [type(layer).__name__ for layer in layers(unet)]
    bad = [k for k in kinds if k not in POOLED + SEQUENCE + (FACEID_PLUS,)]
    if bad:
        out.append(f"IP-Adapter image projections {bad} (supported: {list(POOLED + SEQUENCE + (FACEID_PLUS,))})")
    processors = [type(p).__name__ for p in unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    bad = sorted({p for p in processors if p not in PROCESSORS})
    if bad:
        out.append(f"IP-Adapter attention processors {bad} (supported: {list(PROCESSORS)})")
    return out


def settings(unet) -> dict | None:
    """The adapters' kinds and scales (None without IP-Adapter): what the graphs compute with besides weights.
    Scales are per attention processor as set_ip_adapter_scale leaves them (one list per processor and adapter;
    InstantStyle-like per-block scales differ between processors)."""
    kinds = [type(layer).__name__ for layer in layers(unet)]
    if not kinds:
        return None
    scales = {}
    for name, proc in unet.attn_processors.items():
        if hasattr(proc, "to_k_ip"):
            scales[name.removesuffix(".processor")] = [s if isinstance(s, list) else float(s) for s in proc.scale]
    distinct = {repr(v) for v in scales.values()}
    out = {"adapters": kinds, "scales": next(iter(scales.values())) if len(distinct) == 1 else scales}
    shortcuts = {k: [bool(layer.shortcut), float(layer.shortcut_scale)] for k, layer in enumerate(layers(unet))
                 if type(layer).__name__ == FACEID_PLUS}
    if shortcuts:  # FaceID Plus v2's shortcut (set on the projection by users): it changes the computation
        out["faceid_plus_shortcut"] = {str(k): v for k, v in shortcuts.items()}
    return out


def embed_tail(layer, image_encoder=None) -> tuple[int, ...]:
    """The shape of one image's embedding for `layer` (what follows (batch, images) in image_embeds)."""
    kind = type(layer).__name__
    if kind == "ImageProjection":
        return (layer.image_embeds.in_features,)
    if kind == "IPAdapterFaceIDImageProjection":
        return (layer.ff.net[0].proj.in_features,)
    if kind == FACEID_PLUS:  # the ID embedding; its CLIP states: clip_tail
        return (layer.proj.net[0].proj.in_features,)
    if kind == "IPAdapterPlusImageProjection":
        return (clip_tokens(image_encoder), layer.proj_in.in_features)
    return (clip_tokens(image_encoder), layer.ff.net[0].proj.in_features)  # IPAdapterFullImageProjection


def clip_tokens(image_encoder=None) -> int:
    """Tokens of the image encoder's hidden states (patches and the class token); CLIP ViT-H's without one."""
    vision = getattr(image_encoder, "config", None)
    if vision is not None and getattr(vision, "image_size", None) and getattr(vision, "patch_size", None):
        return (vision.image_size // vision.patch_size) ** 2 + 1
    return CLIP_TOKENS


def clip_tail(layer, image_encoder=None) -> tuple[int, ...] | None:
    """FaceID Plus: the shape of one image's CLIP states (what follows (batch, images) in clip_embeds); None for
    other projections."""
    if type(layer).__name__ != FACEID_PLUS:
        return None
    return (clip_tokens(image_encoder), layer.proj_in.in_features)


def geometry(pipe, unet) -> dict:
    """What the IP-Adapter inputs' shapes depend on besides the build: each adapter's embedding shape (and FaceID
    Plus adapters' CLIP states)."""
    encoder = getattr(pipe, "image_encoder", None)
    tails = [list(embed_tail(layer, encoder)) for layer in layers(unet)]
    if not tails:
        return {}
    clips = {str(k): list(clip_tail(layer, encoder)) for k, layer in enumerate(layers(unet))
             if type(layer).__name__ == FACEID_PLUS}
    return {"ip_adapter_embeds": tails, **({"ip_adapter_clip_embeds": clips} if clips else {})}


def input_specs(geometry: dict, build, batch: int) -> list[TensorSpec]:
    """The graph inputs of the adapters: per adapter its image embeddings, (batch, images, *tail), and with
    build.ip_adapter_masks its mask, (1, images, height, width) as IPAdapterMaskProcessor.preprocess makes it at
    the image size."""
    tails = geometry.get("ip_adapter_embeds", [])
    images = build.ip_adapter_images
    specs = [TensorSpec(EMBEDS.format(k), (batch, images, *tail), build.dtype) for k, tail in enumerate(tails)]
    specs += [TensorSpec(CLIP.format(k), (batch, images, *tail), build.dtype)
              for k, tail in sorted(geometry.get("ip_adapter_clip_embeds", {}).items(), key=lambda kv: int(kv[0]))]
    if build.ip_adapter_masks and tails:
        specs += [TensorSpec(MASKS.format(k), (1, images, build.height, build.width), build.dtype)
                  for k in range(len(tails))]
    return specs


def call_inputs(unet, added_cond_kwargs: dict | None, cross_attention_kwargs: dict | None) -> dict:
    """The IP-Adapter graph inputs of one U-Net call (empty without IP-Adapter); raises for what does not fit."""
    n = len(layers(unet))
    masks = (cross_attention_kwargs or {}).get("ip_adapter_masks")
    if not n:
        if added_cond_kwargs and added_cond_kwargs.get("image_embeds") is not None:
            raise ValueError("image_embeds were given, and this U-Net has no IP-Adapter loaded (pipe.load_ip_adapter)")
        if masks is not None:
            raise ValueError("ip_adapter_masks were given, and this U-Net has no IP-Adapter loaded")
        return {}
    embeds = (added_cond_kwargs or {}).get("image_embeds")
    if embeds is None:
        raise ValueError(f"this U-Net has {n} IP-Adapter(s) loaded and needs their image embeddings each call: pass "
                         "ip_adapter_image= or ip_adapter_image_embeds= to the pipeline, or pipe.unload_ip_adapter()")
    if isinstance(embeds, torch.Tensor):  # diffusers' deprecated single-tensor form
        embeds = [embeds.unsqueeze(1)]
    if len(embeds) != n:
        raise ValueError(f"image_embeds has {len(embeds)} tensor(s); the U-Net has {n} IP-Adapter(s): one per adapter")
    inputs = {EMBEDS.format(k): e for k, e in enumerate(embeds)}
    for k, layer in enumerate(layers(unet)):
        if type(layer).__name__ == FACEID_PLUS:
            if not isinstance(getattr(layer, "clip_embeds", None), torch.Tensor):
                raise ValueError(f"IP-Adapter {k} is FaceID Plus and its projection has no clip_embeds: set "
                                 f"pipe.unet.encoder_hid_proj.image_projection_layers[{k}].clip_embeds before the call, "
                                 "as diffusers' FaceID Plus example does")
            inputs[CLIP.format(k)] = layer.clip_embeds
    if masks is not None:
        if isinstance(masks, torch.Tensor):  # diffusers' older form: (adapters, 1, height, width)
            masks = list(masks.unsqueeze(1))
        if len(masks) != n or any(not isinstance(m, torch.Tensor) or m.ndim != 4 for m in masks):
            raise ValueError(f"ip_adapter_masks must be {n} tensor(s) (one per IP-Adapter, each (1, images, height, "
                             "width) as IPAdapterMaskProcessor.preprocess makes them); to leave an adapter unmasked "
                             "among masked ones, run without DeepCache's graphs (dcaccel.disable)")
        for k, (m, e) in enumerate(zip(masks, embeds)):
            if m.shape[1] != e.shape[1]:
                raise ValueError(f"ip_adapter_masks[{k}] has {m.shape[1]} mask(s) for {e.shape[1]} image(s)")
        inputs.update({MASKS.format(k): m for k, m in enumerate(masks)})
    return inputs


def check_against(specs, inputs: dict, what: str) -> None:
    """Refuse a call whose IP-Adapter inputs are not those the graphs take (masks given to graphs made without
    mask inputs or the other way round, another number of adapters)."""
    names = {t.name for t in specs["full"].call_inputs}
    check_masks(specs, any(n.startswith(MASKS_PREFIX) for n in inputs), what)
    embeds_taken = sum(n.startswith(EMBEDS_PREFIX) for n in names)
    embeds_given = sum(n.startswith(EMBEDS_PREFIX) for n in inputs)
    if embeds_taken != embeds_given:
        raise ValueError(f"{what} take {embeds_taken} IP-Adapter image embedding(s), this call has {embeds_given}: "
                         "IP-Adapters were loaded or unloaded after dcaccel.enable; dcaccel.disable(pipe) and enable "
                         "it again")


def check_masks(specs, masks_given: bool, what: str) -> None:
    masks_taken = any(t.name.startswith(MASKS_PREFIX) for t in specs["full"].call_inputs)
    if masks_given and not masks_taken:
        raise ValueError(f"ip_adapter_masks were given, and {what} were made without mask inputs: "
                         "dcaccel.enable(pipe, ..., ip_adapter_masks=True) (or build with --ip-adapter-masks)")
    if masks_taken and not masks_given:
        raise ValueError(f"{what} were made for masked IP-Adapters (ip_adapter_masks=True) and this call has no "
                         "cross_attention_kwargs['ip_adapter_masks']: pass the masks, or use graphs made without them")


class ImageConditioning(nn.Module):
    """Turns the graph's text states and IP-Adapter inputs into what the attention modules take, as
    UNet2DConditionModel.process_encoder_hidden_states does: (text states, [projected image states])."""

    def __init__(self, unet):
        super().__init__()
        self.n = len(layers(unet))
        self.proj = unet.encoder_hid_proj if self.n else None
        self.clip_ids = [k for k, layer in enumerate(layers(unet)) if type(layer).__name__ == FACEID_PLUS]

    def forward(self, encoder_hidden_states, ip: dict):
        """Returns (encoder_hidden_states for the attention modules, cross_attention_kwargs or None)."""
        if not self.n:
            if ip:
                raise ValueError(f"this U-Net has no IP-Adapter; unexpected graph inputs {sorted(ip)}")
            return encoder_hidden_states, None
        missing = [name for name in [EMBEDS.format(k) for k in range(self.n)] + [CLIP.format(k) for k in self.clip_ids]
                   if name not in ip]
        if missing:  # (a FaceID Plus projection would otherwise read, and an export bake, its attribute)
            raise ValueError(f"this U-Net has {self.n} IP-Adapter(s); the graph call lacks {missing}")
        embeds = [ip[EMBEDS.format(k)] for k in range(self.n)]
        clips = {k: ip[CLIP.format(k)] for k in self.clip_ids}
        if clips:  # FaceID Plus reads its CLIP states from an attribute: the graph's input, for this call only
            projections = self.proj.image_projection_layers
            saved = {k: projections[k].clip_embeds for k in clips}
            for k, value in clips.items():
                projections[k].clip_embeds = value
            try:
                states = (encoder_hidden_states, self.proj(embeds))
            finally:
                for k, value in saved.items():
                    projections[k].clip_embeds = value
        else:
            states = (encoder_hidden_states, self.proj(embeds))
        masks = [ip.get(MASKS.format(k)) for k in range(self.n)]
        if all(m is None for m in masks):
            return states, None
        return states, {"ip_adapter_masks": masks}
