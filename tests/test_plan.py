"""One Plan, one pass (wsconvert.plan): make_plan reads the model once and changes nothing; Plan.apply carries the
plan out on a copy (mapped by module identity) or, transactionally, on the model itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision import models

import wsconvert
from wsconvert import Plan, WSConvertError, convert_model, make_plan, plan_conversion
from wsconvert.rules import RULES, Decision, Rule


class PooledHead(nn.Module):
    """conv -> BN -> ReLU -> global pool -> BatchNorm1d (one value per channel) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.head_bn = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.head_bn(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class Untraceable(PooledHead):
    """Data-dependent control flow: torch.fx cannot trace it, so the probe needs the forward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            return x
        return super().forward(x)


X = torch.randn(2, 3, 8, 8)


def _trained(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affines, so preserve writes values that differ from the originals."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return model.eval()


def _state(model: nn.Module) -> dict:
    """Everything a failed or read-only operation must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "params": [(name, p) for name, p in model.named_parameters()],
        "modules": [(path, m, type(m)) for path, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _state(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key  # bitwise
    assert [(n, id(p)) for n, p in after["params"]] == [(n, id(p)) for n, p in before["params"]]
    assert [(p, id(m), c) for p, m, c in after["modules"]] == [(p, id(m), c) for p, m, c in before["modules"]]
    assert after["training"] == before["training"]


@pytest.mark.parametrize(
    "build, kwargs",
    [
        (PooledHead, {"gn": 8, "example_inputs": X}),
        (Untraceable, {"gn": 8, "skip_unnormalized": True, "example_inputs": X}),
        (PooledHead, {"gn": 8, "preserve": True, "calibration_data": X}),
    ],
    ids=["pooled", "untraceable", "calibration"],
)
def test_make_plan_touches_nothing(build: type, kwargs: dict) -> None:
    model = _trained(build()).train()
    before = _state(model)
    plan = make_plan(model, **kwargs)
    _assert_unchanged(model, before)
    assert isinstance(plan, Plan) and plan.fidelity is None and str(plan) == str(plan.report)
    assert all(step.site.module in set(model.modules()) for step in plan.steps)


@pytest.mark.parametrize(
    "kwargs",
    [{"gn": 8}, {"gn": 8, "example_inputs": X}, {"gn": 8, "skip_unnormalized": True, "input_shape": [1, 3, 8, 8]}],
)
def test_plan_report_equals_plan_conversion(kwargs: dict) -> None:
    model = PooledHead()
    assert make_plan(model, **kwargs).report == plan_conversion(model, **kwargs)
    assert make_plan(model, **kwargs).report.to_dict() == plan_conversion(model, **kwargs).to_dict()


def test_apply_equals_convert_model_on_resnet18() -> None:
    torch.manual_seed(0)
    model = _trained(models.resnet18(num_classes=10))
    x = torch.randn(1, 3, 16, 16)
    expected = convert_model(model, gn=32)(x)

    plan = make_plan(model, gn=32)
    copied = plan.apply(model)
    assert copied is not model and isinstance(copied.bn1, nn.GroupNorm) and isinstance(model.bn1, nn.BatchNorm2d)
    torch.testing.assert_close(copied(x), expected, rtol=0, atol=0)
    assert plan.apply(model) is not copied  # a new copy each time

    same = plan.apply(model, inplace=True)
    assert same is model and isinstance(model.bn1, nn.GroupNorm)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with pytest.raises(WSConvertError, match="already applied in place"):
        plan.apply(model)


def test_apply_to_another_model_raises() -> None:
    plan = make_plan(PooledHead(), gn=8)
    other = PooledHead()
    before = _state(other)
    for inplace in (False, True):
        with pytest.raises(WSConvertError, match="a Plan applies to the model it was made for"):
            plan.apply(other, inplace=inplace)
    _assert_unchanged(other, before)


def _failing_on_third_conv() -> Rule:
    conv = next(rule for rule in RULES if rule.name == "convolution")
    calls = []

    def apply(module: nn.Module, decision: Decision, options: object) -> nn.Module:
        calls.append(module)
        if len(calls) == 3:
            raise RuntimeError("boom on the third module")
        return conv.apply(module, decision, options)

    return dataclasses.replace(conv, name="flaky conv", apply=apply)


class ThreeConvs(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        )


def test_failing_rule_in_place_leaves_the_model_as_it_was() -> None:
    model = _trained(ThreeConvs())
    before = _state(model)
    expected = model(X)
    plan = make_plan(model, gn=4, rules=[_failing_on_third_conv()])
    with pytest.raises(WSConvertError, match=r"converting 4 \(Conv2d, rule 'flaky conv'\) failed.*boom.*left as it"):
        plan.apply(model, inplace=True)
    _assert_unchanged(model, before)
    torch.testing.assert_close(model(X), expected, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["fit_affines", "measure_fidelity", "preserve_convs"])
def test_failing_preserve_step_in_place_leaves_the_model_as_it_was(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsconvert.preserve import calibrate, steps

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{where} failed")

    owner = calibrate if where == "fit_affines" else steps
    monkeypatch.setattr(owner, where, fail)
    model = _trained(PooledHead())
    before = _state(model)
    plan = make_plan(model, gn=8, preserve=True, calibration_data=[X, X])
    with pytest.raises(WSConvertError, match=rf"the preserve step .* failed: RuntimeError: {where} failed.*left as it"):
        plan.apply(model, inplace=True)
    _assert_unchanged(model, before)  # set_affines_from_batchnorm had written into the BatchNorm's Parameters
    assert plan.fidelity is None
    assert isinstance(model.bn1, nn.BatchNorm2d)


def test_fidelity_is_set_on_the_plan_and_the_plan_report_is_not_patched() -> None:
    model = _trained(PooledHead())
    plan = make_plan(model, gn=8, preserve=True, calibration_data=X)
    plan.apply(model)
    assert plan.fidelity is not None and plan.report.fidelity is None
    report = plan_conversion(model, gn=8, preserve=True, calibration_data=X)
    assert report.fidelity == plan.fidelity
    assert dataclasses.replace(report, fidelity=None) == plan.report


def test_rules_are_scoped_to_the_plan() -> None:
    keep_bn = Rule(
        "keep BatchNorm2d",
        lambda m: isinstance(m, nn.BatchNorm2d),
        lambda m, path, options: Decision("skip", reason="kept by this call's rule"),
        lambda m, decision, options: m,
    )
    model = PooledHead()
    scoped = make_plan(model, gn=8, rules=[keep_bn])
    assert {s.path: s.reason for s in scoped.report.skipped} == {
        "bn1": "kept by this call's rule",
        "bn2": "kept by this call's rule",
    }
    converted = scoped.apply(model)
    assert isinstance(converted.bn1, nn.BatchNorm2d) and isinstance(converted.head_bn, nn.GroupNorm)
    plain = make_plan(model, gn=8)
    assert not plain.report.skipped and isinstance(plain.apply(model).bn1, nn.GroupNorm)
    assert isinstance(convert_model(model, gn=8, rules=[keep_bn]).bn2, nn.BatchNorm2d)
    assert isinstance(convert_model(model, gn=8).bn2, nn.GroupNorm)


@pytest.mark.parametrize("build, traces", [(PooledHead, 1), (Untraceable, 1)], ids=["traceable", "untraceable"])
def test_one_walk_one_trace_one_forward(build: type, traces: int, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {"find_sites": 0, "trace": 0, "call": 0, "forward": 0}
    find_sites, trace = wsconvert.walk.find_sites, fx.Tracer.trace

    def counting_find_sites(*args: object, **kwargs: object) -> object:
        counts["find_sites"] += 1
        return find_sites(*args, **kwargs)

    def counting_trace(self: fx.Tracer, *args: object, **kwargs: object) -> object:
        counts["trace"] += 1
        return trace(self, *args, **kwargs)

    class Counted(build):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            counts["forward"] += 1
            return super().forward(x)

    monkeypatch.setattr(wsconvert.walk, "find_sites", counting_find_sites)
    monkeypatch.setattr(fx.Tracer, "trace", counting_trace)
    model = Counted()
    model.register_forward_pre_hook(lambda module, args: counts.__setitem__("call", counts["call"] + 1))
    converted = convert_model(model, gn=8, skip_unnormalized=True, example_inputs=X)
    # one find_sites walk; one fx trace (it runs forward once, with proxies, not through __call__); one hook pass
    assert counts == {"find_sites": 1, "trace": traces, "call": 1, "forward": 2}
    assert converted.head_bn.num_groups == 1 and converted.bn1.num_groups == 8


def test_one_group_for_a_pooled_norm_is_not_a_group_fallback() -> None:
    report = make_plan(PooledHead(), gn=8, example_inputs=X).report
    assert report.group_fallbacks == [] and report.summary()["group_fallbacks"] == 0
    assert {c.path: c.new_type for c in report.converted}["head_bn"] == "GroupNorm(1, 16)"
    assert any(note.startswith("head_bn: its input has one value per channel") for note in report.notes)
    assert "requested groups do not divide" not in str(report)


def test_observations_join_by_identity() -> None:
    model = PooledHead()
    observations = make_plan(model, gn=8, example_inputs=X).observations
    assert observations.probe is not None and observations.probe.method == "fx"
    assert observations.values_per_channel == {"bn1": 64, "bn2": 64, "head_bn": 1}
    assert observations.values_of(model.head_bn) == 1 and observations.values_of(PooledHead().head_bn) is None
    assert observations.forward_failure == ""


def test_failing_example_input_warns_once_and_keeps_groups() -> None:
    with pytest.warns(UserWarning, match="could not be used to check GroupNorm group sizes") as caught:
        plan = make_plan(Untraceable(), gn=8, example_inputs=torch.randn(1, 5, 8, 8))
    assert len([w for w in caught if "GroupNorm group sizes" in str(w.message)]) == 1
    assert plan.observations.forward_failure.startswith("RuntimeError")
    assert plan.observations.probe.method == "unavailable"  # the same one pass served the probe
    assert "forward pass on example_inputs failed" in plan.report.unnormalized_detection


@pytest.mark.parametrize(
    "model, kwargs, error",
    [
        ("not a module", {}, wsconvert.InvalidOptionError),
        (PooledHead(), {"calibration_data": X}, wsconvert.InvalidOptionError),  # without preserve
        (PooledHead(), {"gn": 0}, wsconvert.InvalidOptionError),
        (PooledHead(), {"example_inputs": X, "input_shape": [1, 3, 8, 8]}, wsconvert.InvalidOptionError),
        (PooledHead(), {"rules": ["not a rule"]}, wsconvert.InvalidOptionError),
    ],
    ids=["not-a-module", "calibration-without-preserve", "bad-gn", "both-inputs", "bad-rule"],
)
def test_bad_input(model: object, kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        make_plan(model, **kwargs)
