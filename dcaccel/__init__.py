"""dcaccel: DeepCache for Stable Diffusion as two static graphs, compiled or built into engines.

The public names load lazily (PEP 562), so `import dcaccel` and the command line start without importing torch.
"""

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "BuildConfig": "config", "DeepCacheConfig": "config",
    "Calibration": "calibration", "calibrate": "calibration",
    "FullUNet": "families.unet", "ShallowUNet": "families.unet", "num_branches": "families.unet",
    "split_unet": "families.unet", "split_transformer": "families.mmdit",
    "disable": "pipeline", "enable": "pipeline", "enabled_state": "pipeline", "is_enabled": "pipeline",
    "last_stats": "pipeline",
    "full_steps": "schedule",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dcaccel' has no attribute {name!r}")


def __dir__():
    return __all__
