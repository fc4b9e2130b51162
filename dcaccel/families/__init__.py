"""Model families: one module each, one registry line each.

A family says which pipeline attribute is the denoiser, which pipelines it serves, how the denoiser is checked
and cut into the full and shallow graphs, their specs, and how a call's arguments become graph inputs
(see base.Family).
"""

from __future__ import annotations

import importlib

from .base import Family

FAMILIES = {
    "controlnet": "dcaccel.families.controlnet",
    "unet": "dcaccel.families.unet",
    "mmdit": "dcaccel.families.mmdit",
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose from {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name]).FAMILY


def supported_pipelines() -> list[str]:
    return [p for name in FAMILIES for p in get_family(name).pipelines]


def family_of_pipeline(pipe) -> Family:
    """The family whose pipelines include `pipe`'s class (or a base of it); a clear TypeError otherwise."""
    import diffusers

    for name in FAMILIES:
        family = get_family(name)
        classes = tuple(getattr(diffusers, p) for p in family.pipelines if hasattr(diffusers, p))
        if isinstance(pipe, classes):
            return family
    raise TypeError(f"unsupported pipeline {type(pipe).__name__}; dcaccel supports {supported_pipelines()}")


def family_of_denoiser(denoiser) -> Family:
    for name in FAMILIES:
        family = get_family(name)
        if family.matches(denoiser):
            return family
    raise TypeError(f"unsupported denoiser {type(denoiser).__name__}; dcaccel splits "
                    f"{[get_family(n).name for n in FAMILIES]} models")
