"""wsconvert: Weight Standardization (arXiv:1903.10520) and BatchNorm -> GroupNorm for any PyTorch model.

The public names are imported on first use (PEP 562 module ``__getattr__``), so that ``import wsconvert`` and
the ``wsconvert`` command start without importing torch: the command imports it inside click, where Ctrl-C is
``Aborted!`` (exit 1). ``from wsconvert import convert_model`` and ``wsconvert.convert_model`` work as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _moved

__version__ = "0.1.0"

_moved.install(__name__)  # old flat module paths (wsconvert.probe, ...) keep working

# public name -> the submodule that defines it
_PUBLIC = {
    "convert_model": "convert",
    "plan_conversion": "convert",
    "make_plan": "plan",
    "Plan": "plan",
    "bake": "convert",
    "load": "checkpoint.wholemodel",
    "recompute_in_backward": "ws.recompute",
    "recomputes_in_backward": "ws.recompute",
    "is_standardized": "rules",
    "standardize_weight": "ws.standardize",
    "WeightStandardization": "ws.standardize",
    "BatchChannelNorm": "norms.bcn",
    "ConversionReport": "report",
    "WSConvertError": "errors",
    "InvalidOptionError": "errors",
    "UnsupportedModuleError": "errors",
    "CheckpointError": "errors",
    "ArchitectureError": "errors",
}

__all__ = [
    "convert_model",
    "plan_conversion",
    "make_plan",
    "Plan",
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

if TYPE_CHECKING:  # for type checkers and IDEs: the names as eager imports
    from .checkpoint.wholemodel import load
    from .convert import bake, convert_model, plan_conversion
    from .errors import ArchitectureError, CheckpointError, InvalidOptionError, UnsupportedModuleError, WSConvertError
    from .norms.bcn import BatchChannelNorm
    from .plan import Plan, make_plan
    from .report import ConversionReport
    from .rules import is_standardized
    from .ws.recompute import recompute_in_backward, recomputes_in_backward
    from .ws.standardize import WeightStandardization, standardize_weight


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, e.g. ``wsconvert.checkpoint``) on first access."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
