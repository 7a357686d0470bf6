"""Shared helpers for the wsconvert tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from wsconvert.testing import activation_calls

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` once (registered in sys.modules, so every test shares it)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def count_activation_calls(model: nn.Module, *inputs: object) -> int:
    """How many times activation modules run in one forward pass (the zoo sweep's counter, wsconvert.testing)."""
    return sum(activation_calls(model, inputs).values())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/thirdparty/ carry the ``thirdparty`` marker (``-m "not thirdparty"`` leaves them out)."""
    for item in items:
        if "thirdparty" in Path(str(item.path)).parts:
            item.add_marker(pytest.mark.thirdparty)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> object:
    """One intra-op thread for a test module: on a small, shared CPU more threads than free cores make every op
    far slower (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
