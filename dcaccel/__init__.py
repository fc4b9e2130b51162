"""dcaccel: DeepCache for Stable Diffusion U-Nets as two static graphs, compiled or built into engines."""

from .config import BuildConfig, DeepCacheConfig
from .pipeline import disable, enable, is_enabled, last_stats
from .schedule import full_steps
from .split import FullUNet, ShallowUNet, num_branches, split_unet

__version__ = "0.1.0"

__all__ = [
    "BuildConfig", "DeepCacheConfig", "FullUNet", "ShallowUNet", "disable", "enable", "full_steps",
    "is_enabled", "last_stats", "num_branches", "split_unet", "__version__",
]
