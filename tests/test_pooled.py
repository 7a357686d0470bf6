"""Norm layers on globally pooled features get GroupNorm(1, C) when an example input shows it (wsconvert.probes.pooled).

Regression for the zoo sweep failures of timm resnest14d, rexnet_100 and skresnet18: their BatchNorm after
global pooling became GroupNorm(C, C) on one value per channel, which returns its bias whatever the input
and raises "Expected more than 1 value per channel when training" for a batch of one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from wsconvert import convert_model, plan_conversion
from wsconvert.probes.pooled import norm_values_per_channel

X = torch.randn(1, 8, 12, 12)


class SEWithNorm(nn.Module):
    """conv -> BN -> gate from pooled features: pool -> conv -> BN -> ReLU -> conv -> sigmoid (as in ReXNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc1 = nn.Conv2d(16, 16, 1)
        self.se_bn = nn.BatchNorm2d(16)
        self.fc2 = nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        gate = torch.sigmoid(self.fc2(F.relu(self.se_bn(self.fc1(F.adaptive_avg_pool2d(x, 1))))))
        return x * gate


def test_values_per_channel() -> None:
    sizes, why = norm_values_per_channel(SEWithNorm(), X)
    assert why == "" and sizes == {"bn": 144, "se_bn": 1}
    resnet_sizes, _ = norm_values_per_channel(models.resnet18(), torch.randn(1, 3, 64, 64))
    assert resnet_sizes["bn1"] == 32 * 32 and resnet_sizes["layer4.1.bn2"] == 2 * 2


def test_without_input_the_pooled_norm_is_degenerate() -> None:
    """What the fix is for: GroupNorm(16, 16) on one value per channel ignores its input."""
    model = convert_model(SEWithNorm(), gn=32)
    assert model.se_bn.num_groups == 16
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        model.train()(X)
    out = model.se_bn(torch.randn(4, 16, 1, 1))
    torch.testing.assert_close(out, model.se_bn.bias.detach().view(1, 16, 1, 1).expand(4, 16, 1, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("how", ["example_inputs", "input_shape"])
def test_with_input_the_pooled_norm_gets_one_group(how: str) -> None:
    given = {"example_inputs": X} if how == "example_inputs" else {"input_shape": [1, 8, 12, 12]}
    report = plan_conversion(SEWithNorm(), gn=32, **given)
    fallbacks = {g.path: (g.channels, g.requested, g.groups) for g in report.group_fallbacks}
    assert fallbacks == {"bn": (16, 32, 16)}  # se_bn's one group is not a "groups do not divide" fallback
    assert any(n.startswith("se_bn: its input has one value per channel") for n in report.notes)
    assert {c.path: c.new_type for c in report.converted}["se_bn"] == "GroupNorm(1, 16)"

    model = convert_model(SEWithNorm(), gn=32, **given)
    assert (model.bn.num_groups, model.se_bn.num_groups) == (16, 1)
    out = model.train()(X)  # a batch of one trains
    out.sum().backward()
    assert torch.isfinite(model.fc1.parametrizations.weight.original.grad).all()
    assert model.fc1.parametrizations.weight.original.grad.abs().sum() > 0  # the gate is no longer constant


def test_failing_example_input_warns_and_keeps_groups() -> None:
    with pytest.warns(UserWarning, match="could not be used to check GroupNorm group sizes"):
        model = convert_model(SEWithNorm(), gn=32, example_inputs=torch.randn(1, 3, 12, 12))
    assert model.se_bn.num_groups == 16


def test_no_groups_to_choose_means_no_forward_pass() -> None:
    class Counting(SEWithNorm):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Counting.calls += 1
            return super().forward(x)

    convert_model(Counting(), example_inputs=X)  # gn=None: norm layers are kept
    convert_model(Counting(), gn=1, example_inputs=X)  # one group already
    assert Counting.calls == 0


@pytest.mark.parametrize("name", ["resnest14d", "rexnet_100", "skresnet18"])
def test_timm_models_from_the_sweep_train_with_batch_one(name: str) -> None:
    import timm

    x = torch.randn(1, 3, 64, 64)
    model = convert_model(timm.create_model(name, pretrained=False), gn=32, example_inputs=x)
    out = model.train()(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    pooled = [m for m in model.modules() if isinstance(m, nn.GroupNorm) and m.num_groups == 1]
    assert pooled
