"""The convert-first rule: wsconvert refuses a model that is, or contains, a training wrapper (issue 4, point 8).

DDP and FSDP2 need a process group and are checked in test_integration_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wsconvert
from wsconvert.integrations import find_wrapper


def small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.GroupNorm(4, 8), nn.ReLU())


def _opacus(model: nn.Module) -> nn.Module:
    import opacus

    return opacus.GradSampleModule(model)


WRAPPERS = {
    "torch.compile": (lambda m: torch.compile(m), "._orig_mod"),
    "DataParallel": (lambda m: nn.DataParallel(m), ".module"),
    "Opacus GradSampleModule": (_opacus, "._module"),
}


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("entry", ["convert_model", "plan_conversion", "bake"])
def test_wrapped_model_is_refused_with_the_way_out(wrapper: str, entry: str) -> None:
    wrap, bare = WRAPPERS[wrapper]
    wrapped = wrap(small())
    with pytest.raises(wsconvert.InvalidOptionError) as error:
        getattr(wsconvert, entry)(wrapped)
    message = str(error.value)
    assert f"the model is wrapped by {wrapper}" in message
    assert "convert the bare model first, then wrap it" in message and f"({bare})" in message


def test_wrapper_inside_the_model_is_named_by_its_path() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(nn.Identity(), torch.compile(small())))
    assert find_wrapper(model) == ("1.1", "torch.compile", "._orig_mod")
    with pytest.raises(wsconvert.InvalidOptionError, match=r"^1\.1 is wrapped by torch\.compile"):
        wsconvert.convert_model(model, gn=4)


def test_convert_then_wrap_is_accepted() -> None:
    converted = wsconvert.convert_model(small(), gn=4)
    assert find_wrapper(converted) is None
    compiled = torch.compile(converted)
    assert find_wrapper(compiled) == ("the model", "torch.compile", "._orig_mod")
    assert wsconvert.bake(compiled._orig_mod) is not None  # bake the unwrapped model, as the docs say
