"""The exception hierarchy: every error wsconvert raises on purpose is a WSConvertError.

Messages name the module path or the value that failed and say what to do instead.
"""

from __future__ import annotations

__all__ = [
    "WSConvertError",
    "InvalidOptionError",
    "UnsupportedModuleError",
    "CheckpointError",
    "ArchitectureError",
]


class WSConvertError(ValueError):
    """Base class of all wsconvert errors (a ValueError, so generic handlers still catch it)."""


class InvalidOptionError(WSConvertError):
    """An option given to convert_model / plan_conversion / the CLI has a bad value."""


class UnsupportedModuleError(WSConvertError):
    """A module cannot be converted in its current state (e.g. an uninitialized lazy module)."""


class CheckpointError(WSConvertError):
    """A checkpoint file cannot be read, recognized, matched to an architecture or written."""


class ArchitectureError(WSConvertError):
    """An architecture spec (torchvision:NAME, timm:NAME, module:callable) cannot be resolved."""
