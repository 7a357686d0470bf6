"""Real torchvision and timm models (random weights): everything converts, trains and stays numerically right."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from conftest import count_activation_calls
from timm.layers import StdConv2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.testing import assert_close
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from wsconvert import WeightStandardization, convert_model, is_standardized, plan_conversion, standardize_weight

CLASSIFIERS = {
    "tv-resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "tv-resnext50_32x4d": (lambda: torchvision.models.resnext50_32x4d(num_classes=10), (2, 3, 32, 32)),
    "tv-mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (2, 3, 32, 32)),
    "tv-efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), (2, 3, 32, 32)),
    "tv-densenet121": (lambda: torchvision.models.densenet121(num_classes=10), (2, 3, 32, 32)),
    "tv-r3d_18": (lambda: torchvision.models.video.r3d_18(num_classes=10), (2, 3, 4, 32, 32)),
    "timm-resnetv2_50": (lambda: timm.create_model("resnetv2_50", num_classes=10), (2, 3, 32, 32)),
    "timm-efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), (2, 3, 32, 32)),
    "timm-resnetv2_50x1_bit": (lambda: timm.create_model("resnetv2_50x1_bit", num_classes=10), (2, 3, 32, 32)),
}


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (_BatchNorm, FrozenBatchNorm2d))]


def _convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]


@pytest.mark.parametrize(("make", "shape"), list(CLASSIFIERS.values()), ids=list(CLASSIFIERS))
def test_real_model_converts_trains_and_keeps_every_activation(make, shape):
    model = make().eval()
    x = torch.randn(shape)
    report = plan_conversion(model, gn=32)
    converted = convert_model(model, gn=32).eval()

    assert _norms(converted) == []
    assert count_activation_calls(converted, x) == count_activation_calls(model, x)
    # every conv and norm is accounted for in the report
    accounted = {c.path for c in report.converted} | {s.path for s in report.skipped}
    expected = {n for n, m in model.named_modules() if m in _convs(model) or m in _norms(model)}
    assert accounted == expected
    # nothing standardized twice: at most one WS parametrization, and never on a timm StdConv
    for module in converted.modules():
        chain = getattr(getattr(module, "parametrizations", None), "weight", [])
        assert sum(isinstance(p, WeightStandardization) for p in chain) <= 1
        if isinstance(module, StdConv2d):
            assert len(chain) == 0

    converted.train()
    out = converted(x)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in converted.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("style", ["standard", "paper"])
@pytest.mark.parametrize(("make", "shape"), [CLASSIFIERS["tv-resnext50_32x4d"], CLASSIFIERS["timm-efficientnet_b0"]])
def test_every_standardized_weight_matches_the_formula(make, shape, style):
    model = make()
    converted = convert_model(model, style=style)
    originals = dict(model.named_modules())
    checked = 0
    for name, module in converted.named_modules():
        if is_standardized(module) and not isinstance(module, StdConv2d):
            w = originals[name].weight.detach().double()
            rows = w.reshape(w.shape[0], -1)
            centered = rows - rows.mean(1, keepdim=True)
            if style == "standard":
                expected = centered / torch.sqrt(centered.square().mean(1, keepdim=True) + 1e-5)
            else:
                expected = centered / (rows.std(1, keepdim=True) + 1e-5)
            assert_close(module.weight.detach().double(), expected.reshape(w.shape), rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == len([m for m in model.modules() if isinstance(m, nn.Conv2d)]) - _fan_in_one(model)


def _fan_in_one(model: nn.Module) -> int:
    return sum(1 for m in _convs(model) if m.weight[0].numel() == 1)


def _swap_in_timm_stdconv(model: nn.Module, eps: float) -> nn.Module:
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Conv2d:
                std = StdConv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    groups=child.groups,
                    bias=child.bias is not None,
                    eps=eps,
                )
                std.load_state_dict(child.state_dict())
                setattr(module, child_name, std)
    return model


@pytest.mark.parametrize("eps", [1e-5, 1e-8])
def test_whole_model_output_equals_timm_stdconv2d(eps):
    # train mode: BatchNorm normalizes with batch statistics (eval-mode defaults let activations grow to 1e15)
    model = torchvision.models.resnet18(num_classes=10)
    ours = convert_model(model, eps=eps)
    timms = _swap_in_timm_stdconv(model, eps)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours(x), timms(x), rtol=1e-4, atol=1e-4)


def _frozen_bn_detector() -> nn.Module:
    backbone = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    return FasterRCNN(_resnet_fpn_extractor(backbone, 3), num_classes=3, min_size=64, max_size=64)


def test_detection_model_with_frozen_batchnorm():
    model = _frozen_bn_detector()
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    converted = convert_model(model, gn=32)
    assert _norms(converted) == []
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    converted.train()
    losses = converted(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    converted.eval()
    with torch.no_grad():
        detections = converted(images)
    assert len(detections) == 2
    converted.load_state_dict(model.state_dict(), strict=True)


def test_standardize_weight_agrees_with_the_parametrized_conv():
    model = torchvision.models.resnet18(num_classes=10)
    converted = convert_model(model)
    assert_close(converted.conv1.weight, standardize_weight(model.conv1.weight.detach()))
