"""wsconvert.testing.check_conversion: passes on correct conversions, names the module path of every violation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize

import wsconvert
from wsconvert.errors import InvalidOptionError, WSConvertError
from wsconvert.testing import ConversionCheck, ConversionCheckError, activation_calls, check_conversion
from wsconvert.ws.standardize import WeightStandardization

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 16, 16)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.bn(self.conv(x)))).mean((2, 3))


class OwnForwardBatchNorm(nn.BatchNorm2d):
    """wsconvert skips a BatchNorm subclass with its own forward (with a reason): a BatchNorm stays."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class TimmStyle(nn.Module):
    """timm's BatchNormAct2d (activation inside the norm layer) and an already standardized StdConv2d."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import BatchNormAct2d, StdConv2d

        self.stem = StdConv2d(3, 8, 3)
        self.bn = BatchNormAct2d(8, act_layer=nn.SiLU)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(self.stem(x))).mean((2, 3))


def _pair(build: Callable[[], nn.Module] = Small, **options: object):
    model = build()
    report = wsconvert.plan_conversion(model, **options)
    return model, wsconvert.convert_model(model, **options), report


# --- correct conversions pass ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "options", "inputs"),
    [
        (lambda: torchvision.models.resnet18(num_classes=4), {"gn": 32}, torch.randn(2, 3, 32, 32)),
        (lambda: torchvision.models.resnet18(num_classes=4), {}, (torch.randn(2, 3, 32, 32),)),
        (Small, {"gn": 4, "norm": "bcn"}, X),  # the BCN keeps a BatchNorm part: not a leftover
        (Small, {"gn": 4, "exclude": ["bn"]}, X),  # an excluded BatchNorm stays on purpose
        (Small, {"gn": 4, "preserve": True}, X),
        (TimmStyle, {"gn": 4}, X),  # GroupNormAct keeps the SiLU; StdConv2d is not standardized again
    ],
    ids=["resnet18-gn", "resnet18-ws-only", "bcn", "exclude", "preserve", "timm"],
)
def test_correct_conversion_passes(build: Callable[[], nn.Module], options: dict, inputs: object) -> None:
    model, converted, report = _pair(build, **options)
    result = check_conversion(model, converted, inputs, report=report)
    assert isinstance(result, ConversionCheck) and result.ok, str(result)
    assert result.convs == sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    assert result.standardized == report.summary()["standardized"]
    assert result.activations_before == result.activations_after > 0
    assert str(result).startswith("check_conversion: ok")


def test_timm_efficientnet_passes() -> None:
    timm = pytest.importorskip("timm")
    model, converted, report = _pair(lambda: timm.create_model("efficientnet_b0", pretrained=False), gn=32)
    assert check_conversion(model, converted, torch.randn(1, 3, 32, 32), report=report).ok


def test_models_are_left_as_found() -> None:
    model, converted, report = _pair(Small, gn=4, norm="bcn")  # the BCN's BatchNorm part has running stats
    model.train()
    converted.bn.eval()  # a mixed mode, to see every flag restored
    converted.conv.parametrizations.weight.original.grad = torch.ones_like(
        converted.conv.parametrizations.weight.original
    )
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, converted)]
    modes = [[m.training for m in net.modules()] for net in (model, converted)]
    grad = converted.conv.parametrizations.weight.original.grad
    rng = torch.get_rng_state()
    check_conversion(model, converted, X, report=report)
    for net, state, mode in zip((model, converted), states, modes, strict=True):
        torch.testing.assert_close(net.state_dict(), state, rtol=0, atol=0)
        assert [m.training for m in net.modules()] == mode
    assert converted.conv.parametrizations.weight.original.grad is grad
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for name, p in converted.named_parameters() if not name.startswith("conv."))
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(m._forward_hooks for m in [*model.modules(), *converted.modules()])


def test_meta_device_checks_structure_only() -> None:
    with torch.device("meta"):
        model, converted, report = _pair(Small, gn=4)
        inputs = torch.randn(2, 3, 16, 16)
    assert check_conversion(model, converted, inputs, report=report).ok


def test_activation_calls_per_path() -> None:
    model = Small()
    model.extra = nn.GELU()
    assert activation_calls(model, X) == {"act": 1, "extra": 0}
    assert not model.act._forward_hooks


# --- broken conversions fail, naming the module ---------------------------------------------------


def _twice(net: nn.Module) -> None:
    ws = WeightStandardization.for_conv(net.conv, 1e-5, "standard")
    parametrize.register_parametrization(net.conv, "weight", ws, unsafe=True)


def _drop_activation(net: nn.Module) -> None:
    net.act = nn.Identity()


def _leave_batchnorm(net: nn.Module) -> None:
    net.bn = nn.BatchNorm2d(8)


def _inf_bias(net: nn.Module) -> None:
    with torch.no_grad():
        net.bn.bias.fill_(float("inf"))


def _nan_gradient(net: nn.Module) -> None:
    net.bn.weight.register_hook(lambda grad: grad * float("nan"))


def _raise_in_training(net: nn.Module) -> None:
    def pre_hook(module: nn.Module, args: tuple) -> None:
        if module.training:
            raise RuntimeError("broken in training")

    net.head.register_forward_pre_hook(pre_hook)


BROKEN = [
    ("standardized twice", _twice, "standardized_twice", ["conv: 2 WeightStandardization parametrizations"]),
    ("dropped activation", _drop_activation, "activations", ["1 before, 0 after", "act: 1 call(s) before, 0 after"]),
    ("batchnorm left", _leave_batchnorm, "batchnorm_left", ["1 BatchNorm-family layer(s) left", "bn (BatchNorm2d)"]),
    ("non-finite output", _inf_bias, "finite", ["non-finite output in training mode", "bn (GroupNorm)"]),
    ("non-finite gradient", _nan_gradient, "finite", ["non-finite gradient: bn.weight"]),
    ("forward raises", _raise_in_training, "error", ["training-mode forward raised RuntimeError: broken in training"]),
]


@pytest.mark.parametrize(("name", "breaks", "check", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_conversion_fails(name: str, breaks: Callable, check: str, expected: list[str]) -> None:
    model, converted, report = _pair(Small, gn=4)
    breaks(converted)
    with pytest.raises(ConversionCheckError) as caught:
        check_conversion(model, converted, X, report=report)
    message = str(caught.value)
    for text in expected:
        assert text in message, message
    assert check in {v.check for v in caught.value.result.violations}
    assert isinstance(caught.value, AssertionError) and isinstance(caught.value, WSConvertError)


def test_non_finite_eval_output_names_the_module() -> None:
    model, converted, _ = _pair(Small, gn=4)
    _inf_bias(converted)
    violations = check_conversion(model, converted, X, raise_on_failure=False).violations
    assert [str(v) for v in violations if v.message == "non-finite output in eval mode"] == [
        "non-finite output in eval mode\n    first non-finite output: bn (GroupNorm)"
    ]


def test_timm_stdconv_standardized_again() -> None:
    model, converted, report = _pair(TimmStyle, gn=4)
    ws = WeightStandardization.for_conv(converted.stem, 1e-5, "standard")
    parametrize.register_parametrization(converted.stem, "weight", ws, unsafe=True)
    with pytest.raises(ConversionCheckError) as caught:
        check_conversion(model, converted, X, report=report)
    message = str(caught.value)
    assert "stem: timm StdConv2d standardized again by wsconvert" in message
    assert "stem: standardized but not reported as standardized" in message


def test_skipped_batchnorm_subclass_is_a_leftover() -> None:
    def build() -> nn.Module:
        model = Small()
        model.bn = OwnForwardBatchNorm(8)
        return model

    model, converted, report = _pair(build, gn=4)
    result = check_conversion(model, converted, X, report=report, raise_on_failure=False)
    assert [v.message for v in result.violations] == [
        "1 BatchNorm-family layer(s) left after a gn=4 conversion: bn (OwnForwardBatchNorm)"
    ]


def test_report_missing_a_module() -> None:
    model, converted, report = _pair(Small, gn=4)
    partial = dataclasses.replace(report, converted=[c for c in report.converted if c.path != "head"])
    with pytest.raises(ConversionCheckError) as caught:
        check_conversion(model, converted, X, report=partial)
    message = str(caught.value)
    assert "1 conv/norm layer(s) missing from the report: head (Conv2d)" in message
    assert "2 WS-parametrized convs but the report says 1: head" in message
    assert "head: standardized but not reported as standardized" in message


def test_report_claims_a_conv_that_is_not_standardized() -> None:
    model, converted, report = _pair(Small, gn=4)
    parametrize.remove_parametrizations(converted.head, "weight")
    message = str(check_conversion(model, converted, X, report=report, raise_on_failure=False))
    assert "head: reported as standardized but carries no new WeightStandardization" in message


def test_every_violation_is_listed_and_the_cause_chained() -> None:
    model, converted, report = _pair(Small, gn=4)
    for breaks in (_twice, _drop_activation, _leave_batchnorm, _raise_in_training):
        breaks(converted)
    with pytest.raises(ConversionCheckError) as caught:
        check_conversion(model, converted, X, report=report)
    checks = [v.check for v in caught.value.result.violations]
    assert checks == ["batchnorm_left", "standardized_twice", "activations", "error"]
    assert str(caught.value).startswith("check_conversion: 4 invariant(s) violated:")
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_frozen_model_needs_backward_false() -> None:
    model, converted, report = _pair(Small, gn=4)
    converted.requires_grad_(False)
    with pytest.raises(ConversionCheckError, match="does not require grad.*backward=False"):
        check_conversion(model, converted, X, report=report)
    assert check_conversion(model, converted, X, report=report, backward=False).ok


def test_train_inputs_are_used_in_training_mode() -> None:
    class Needs(Small):
        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            if self.training and scale == 1.0:
                raise RuntimeError("training needs a scale")
            return super().forward(x) * scale

    model, converted, report = _pair(Needs, gn=4)
    assert check_conversion(model, converted, X, train_inputs=(X, 2.0), report=report).ok


# --- bad arguments --------------------------------------------------------------------------------

BAD = [
    (lambda m, c, r: check_conversion("net", c, X), "original must be an nn.Module, got str"),
    (lambda m, c, r: check_conversion(m, m, X), "original and converted are the same object"),
    (lambda m, c, r: check_conversion(m, c, X, report={"gn": 4}), "report=dict must be a ConversionReport"),
    (lambda m, c, r: check_conversion(m, c, X, gn=0), "gn=0 must be the conversion's integer gn"),
    (lambda m, c, r: check_conversion(m, c, X, gn=True), "gn=True must be"),
    (lambda m, c, r: check_conversion(m, c, X, report=r, gn=8), "gn=8 but the report was planned with gn=4"),
    (lambda m, c, r: check_conversion(m, c, X, backward="yes"), "backward='yes' must be True or False"),
    (lambda m, c, r: check_conversion(m, c, X, raise_on_failure=1), "raise_on_failure=1 must be True or False"),
    (lambda m, c, r: check_conversion(m, c, torch.randn(2, 5, 8, 8)), "the original Small raised RuntimeError"),
]


@pytest.mark.parametrize(("call", "message"), BAD, ids=[b[1][:30] for b in BAD])
def test_bad_arguments(call: Callable, message: str) -> None:
    model, converted, report = _pair(Small, gn=4)
    with pytest.raises(InvalidOptionError) as caught:
        call(model, converted, report)
    assert message in str(caught.value)
    assert not isinstance(caught.value, AssertionError)
