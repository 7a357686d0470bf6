"""bake(): plain modules with the standardized weights, for inference and export."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from wsconvert import bake, convert_model, is_standardized


@pytest.fixture
def converted() -> nn.Module:
    return convert_model(torchvision.models.resnet18(num_classes=10), gn=32).eval()


def test_baked_outputs_are_bitwise_equal_in_eval(converted):
    baked = bake(converted)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(baked(x), converted(x))


def test_baked_model_has_plain_classes_and_weights(converted):
    baked = bake(converted)
    assert not any(parametrize.is_parametrized(m) for m in baked.modules())
    assert type(baked.conv1) is nn.Conv2d
    assert not any(is_standardized(m) for m in baked.modules())
    assert torch.equal(baked.conv1.weight, converted.conv1.weight)
    assert "conv1.weight" in baked.state_dict()


def test_baking_a_copy_leaves_the_original_working(converted):
    # copy.deepcopy shares parametrize's per-module class: removing it from the copy must not break the original
    bake(converted)
    assert is_standardized(converted.conv1)
    converted(torch.randn(1, 3, 32, 32))


def test_bake_inplace_returns_the_same_model(converted):
    weight = converted.conv1.parametrizations.weight.original
    baked = bake(converted, inplace=True)
    assert baked is converted
    assert converted.conv1.weight is weight  # the Parameter object survives, now holding W_hat


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_baked_model_pickles_and_scripts(converted):
    baked = bake(converted)
    buffer = io.BytesIO()
    torch.save(baked, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), baked(x))
        scripted = torch.jit.script(baked)
        torch.testing.assert_close(scripted(x), baked(x))


def test_parametrized_model_cannot_be_pickled_whole_but_baked_can(converted):
    with pytest.raises(RuntimeError, match="only supported through state_dict"):
        torch.save(converted, io.BytesIO())


def test_bake_leaves_other_parametrizations_alone():
    model = nn.Sequential(spectral_norm(nn.Conv2d(3, 4, 3)), nn.Conv2d(4, 4, 3))
    baked = bake(convert_model(model))
    assert parametrize.is_parametrized(baked[0], "weight")
    assert not parametrize.is_parametrized(baked[1])
