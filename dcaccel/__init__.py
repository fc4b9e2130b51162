"""dcaccel: DeepCache for Stable Diffusion as two static graphs, compiled or built into engines."""

from .config import BuildConfig, DeepCacheConfig
from .families.unet import FullUNet, ShallowUNet, num_branches, split_unet
from .pipeline import disable, enable, enabled_state, is_enabled, last_stats
from .schedule import full_steps

__version__ = "0.2.0"

__all__ = [
    "BuildConfig", "DeepCacheConfig", "FullUNet", "ShallowUNet", "disable", "enable", "enabled_state", "full_steps",
    "is_enabled", "last_stats", "num_branches", "split_unet", "__version__",
]
