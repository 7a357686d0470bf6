"""Glue for training engines: the convert-first rule (wrappers) and Opacus per-sample gradients (opacus).

``wsconvert.integrations.ultralytics`` (YOLO models that predict, val, export, save and train converted) is
imported on its own: it calls ``convert`` and ``bake``, so this package does not import it.
"""

from __future__ import annotations

from ..ws.detect import has_standardization
from .opacus import enable_opacus
from .wrappers import check_unwrapped, find_wrapper

__all__ = ["check_unwrapped", "enable_opacus", "find_wrapper", "has_standardization"]
