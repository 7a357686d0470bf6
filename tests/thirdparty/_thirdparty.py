"""Tests that build real third-party models (the ``thirdparty`` extra: transformers, ultralytics, smp, MONAI,
effdet, pytorchvideo, open_clip; docs/ecosystem.md).

Each test module starts with ``from _thirdparty import needs`` and ``lib = needs("transformers")``. Without
the library the module is skipped, unless ``WSCONVERT_REQUIRE_THIRDPARTY=1`` (what ``.ci/run`` sets): then a
missing library is a failure, so a CI install that lost the extra cannot pass by skipping every test here.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def required() -> bool:
    """Whether a missing third-party library fails (CI) instead of skipping."""
    return os.environ.get("WSCONVERT_REQUIRE_THIRDPARTY", "0") == "1"


def needs(module: str) -> ModuleType:
    """Import ``module`` for a test module; skip it when the library is missing (fail under CI)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        message = f"{module} is not installed (pip install -e '.[test,thirdparty]'): {error}"
        if required():
            pytest.fail(f"WSCONVERT_REQUIRE_THIRDPARTY=1 but {message}", pytrace=False)
        pytest.skip(message, allow_module_level=True)
