"""State-dict compatibility: original checkpoints load into converted models, converted ones round-trip."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.testing import assert_close
from torchvision.ops.misc import FrozenBatchNorm2d

from wsconvert import convert_model

ARCHS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "frozen-bn-resnet18": (
        lambda: torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d),
        (2, 3, 32, 32),
    ),
    "timm-resnet18d": (lambda: timm.create_model("resnet18d", num_classes=10), (2, 3, 32, 32)),
    "timm-efficientnet_b0-bnact": (lambda: timm.create_model("efficientnet_b0", num_classes=10), (2, 3, 32, 32)),
    "convtranspose": (
        lambda: nn.Sequential(nn.ConvTranspose2d(3, 8, 2, stride=2), nn.BatchNorm2d(8), nn.ReLU()),
        (2, 3, 8, 8),
    ),
}

OPTIONS = [{"gn": None}, {"gn": 32}, {"gn": 8, "style": "paper", "eps": 1e-4}]


def _trained_like(model: nn.Module) -> nn.Module:
    """Random, non-default values everywhere (norm affine and running stats included)."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in name else torch.randn_like(tensor))
    return model


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize(("make", "shape"), list(ARCHS.values()), ids=list(ARCHS))
def test_original_state_dict_loads_strictly_and_computes_like_converting_the_trained_model(make, shape, options):
    trained = _trained_like(make()).eval()
    expected_model = convert_model(trained, **options).eval()

    fresh = convert_model(make(), **options).eval()
    result = fresh.load_state_dict(trained.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    x = torch.randn(shape)
    with torch.no_grad():
        assert_close(fresh(x), expected_model(x))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize(("make", "shape"), list(ARCHS.values()), ids=list(ARCHS))
def test_converted_state_dict_round_trips_into_a_fresh_conversion(make, shape, options):
    converted = convert_model(_trained_like(make()), **options).eval()
    state = converted.state_dict()
    assert not any(key.endswith("conv1.weight") for key in state)  # conv weights moved under parametrizations
    fresh = convert_model(make(), **options).eval()
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(shape)
    with torch.no_grad():
        assert_close(fresh(x), converted(x))


def test_running_statistics_are_ignored_and_other_mismatches_still_fail():
    model = torchvision.models.resnet18(num_classes=10)
    converted = convert_model(model, gn=32)
    state = model.state_dict()
    assert "bn1.running_mean" in state
    converted.load_state_dict(state, strict=True)

    missing = dict(state)
    del missing["layer1.0.conv1.weight"]
    with pytest.raises(RuntimeError, match=r"layer1\.0\.conv1\.parametrizations\.weight\.original"):
        converted.load_state_dict(missing, strict=True)

    wrong_head = torchvision.models.resnet18(num_classes=7).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for fc.weight"):
        converted.load_state_dict(wrong_head, strict=True)


def test_loading_does_not_mutate_the_callers_state_dict():
    model = torchvision.models.resnet18(num_classes=10)
    state = model.state_dict()
    keys = list(state)
    convert_model(model, gn=32).load_state_dict(state)
    assert list(state) == keys


def test_converted_model_survives_deepcopy_with_its_load_hooks():
    model = torchvision.models.resnet18(num_classes=10)
    converted = copy.deepcopy(convert_model(model, gn=32))
    converted.load_state_dict(model.state_dict(), strict=True)
