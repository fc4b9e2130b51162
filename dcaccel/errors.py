"""The errors dcaccel raises beyond ValueError/TypeError, and the lazy import of optional packages."""

from __future__ import annotations

import importlib


class EngineError(RuntimeError):
    """An engine directory that cannot be used: missing, truncated, edited, or built for something else."""


class MissingDependencyError(ImportError):
    """An optional package a backend needs is not installed."""


def require(module: str, backend: str, extra: str):
    """Import `module`, or say which extra of dcaccel installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"backend {backend!r} needs the package {module!r} ({e}); install it with: pip install 'dcaccel[{extra}]'"
        ) from e
