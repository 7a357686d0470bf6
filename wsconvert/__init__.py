"""wsconvert: Weight Standardization (arXiv:1903.10520) and BatchNorm -> GroupNorm for any PyTorch model."""

from __future__ import annotations

from .bcn import BatchChannelNorm
from .convert import bake, convert_model, plan_conversion
from .errors import (
    ArchitectureError,
    CheckpointError,
    InvalidOptionError,
    UnsupportedModuleError,
    WSConvertError,
)
from .recompute import recompute_in_backward, recomputes_in_backward
from .report import ConversionReport
from .rules import is_standardized
from .standardize import WeightStandardization, standardize_weight
from .wholemodel import load

__version__ = "0.1.0"

__all__ = [
    "convert_model",
    "plan_conversion",
    "bake",
    "load",
    "recompute_in_backward",
    "recomputes_in_backward",
    "is_standardized",
    "standardize_weight",
    "WeightStandardization",
    "BatchChannelNorm",
    "ConversionReport",
    "WSConvertError",
    "InvalidOptionError",
    "UnsupportedModuleError",
    "CheckpointError",
    "ArchitectureError",
    "__version__",
]
