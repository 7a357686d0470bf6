"""The conversion contracts of convert_model / plan_conversion / bake (issue 10, points 5-8 and 16).

- every BatchNorm variant (weight-only or bias-only affine, no affine, parametrized weight/bias, frozen, timm,
  SyncBatchNorm) is planned as it is converted, and the GroupNorm computes the same function;
- a parametrization on a BatchNorm's weight or bias is carried over to the GroupNorm, not frozen;
- a conversion that fails part way leaves the model exactly as it was (``inplace=True`` included);
- a plain state dict loads after torch's own ``remove_parametrizations``;
- TorchScript modules are refused with the way out.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close
from torchvision.ops.misc import FrozenBatchNorm2d

from wsconvert import UnsupportedModuleError, WSConvertError, bake, convert_model, plan_conversion, rules
from wsconvert.rules import type_name

pytestmark = pytest.mark.usefixtures("one_thread")

C, GROUPS = 8, 4


class Abs(nn.Module):
    """A parametrization without right_inverse: keeps a scale non-negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


class Scale(nn.Module):
    """A parametrization with a right_inverse (parametrize would call it on registration)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x / 2.0


def _randomized(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, tensor in [*norm.named_parameters(), *norm.named_buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "var" in name else torch.randn_like(tensor))
    return norm


def _without(name: str, norm: nn.Module) -> nn.Module:
    setattr(norm, name, None)  # how bias=False / weight-only affine layers arise (timm, hand-edited models)
    return norm


def _parametrized(norm: nn.Module, *names: str) -> nn.Module:
    for name in names:
        parametrize.register_parametrization(norm, name, Abs() if name == "weight" else Scale())
    return norm


def _registered_none(norm: nn.Module) -> nn.Module:
    norm.register_parameter("bias", None)
    return norm


# name -> (a BatchNorm-like layer with random statistics, what its GroupNorm holds: "both", "weight", "bias", "none")
NORMS = {
    "plain": (lambda: nn.BatchNorm2d(C), "both"),
    "bias=None": (lambda: _without("bias", nn.BatchNorm2d(C)), "weight"),
    "register_parameter(bias, None)": (lambda: _registered_none(nn.BatchNorm2d(C)), "weight"),
    "weight=None": (lambda: _without("weight", nn.BatchNorm2d(C)), "bias"),
    "weight=bias=None": (lambda: _without("bias", _without("weight", nn.BatchNorm2d(C))), "none"),
    "affine=False": (lambda: nn.BatchNorm2d(C, affine=False), "none"),
    "bn1d bias=None": (lambda: _without("bias", nn.BatchNorm1d(C)), "weight"),
    "parametrized weight": (lambda: _parametrized(nn.BatchNorm2d(C), "weight"), "both"),
    "parametrized bias": (lambda: _parametrized(nn.BatchNorm2d(C), "bias"), "both"),
    "parametrized both": (lambda: _parametrized(nn.BatchNorm2d(C), "weight", "bias"), "both"),
    "parametrized weight, bias=None": (lambda: _parametrized(_without("bias", nn.BatchNorm2d(C)), "weight"), "weight"),
    "FrozenBatchNorm2d": (lambda: FrozenBatchNorm2d(C), "both"),
    "timm BatchNormAct2d": (lambda: BatchNormAct2d(C, act_layer=nn.Identity), "both"),
    "timm BatchNormAct2d bias=None": (lambda: _without("bias", BatchNormAct2d(C, act_layer=nn.Identity)), "weight"),
    "SyncBatchNorm": (lambda: nn.SyncBatchNorm(C), "both"),
    "SyncBatchNorm weight=None": (lambda: _without("weight", nn.SyncBatchNorm(C)), "bias"),
}


def _net(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, C, 3, padding=1), _randomized(norm))


def _expected_group_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm computed with the BatchNorm's effective (parametrized) affine weight and bias."""
    return F.group_norm(x, GROUPS, getattr(norm, "weight", None), getattr(norm, "bias", None), norm.eps)


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_norm_variant_plan_agrees_with_conversion(name: str, inplace: bool) -> None:
    make, holds = NORMS[name]
    model = _net(make()).eval()
    norm = model[1]
    with torch.no_grad():
        y = model[0](torch.randn(2, 3, 5, 5))  # the conv's output, before conversion
        expected = _expected_group_norm(norm, y)
    originals = {n: getattr(norm, n) for n in ("weight", "bias")}
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    report = plan_conversion(model, gn=GROUPS)
    converted = convert_model(model, gn=GROUPS, inplace=inplace).eval()

    planned = {c.path: c.new_type for c in report.converted}
    result = {path: type_name(m) for path, m in converted.named_modules() if path in planned}
    assert planned["1"].startswith(result["1"]) and result["1"] != type_name(norm)
    assert report.skipped == []
    gn = converted[1]
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == GROUPS
    assert [n for n in ("weight", "bias") if getattr(gn, n) is not None] == {
        "both": ["weight", "bias"],
        "weight": ["weight"],
        "bias": ["bias"],
        "none": [],
    }[holds]
    with torch.no_grad():
        assert_close(gn(y), expected)
    converted.load_state_dict(state_dict, strict=True)  # the BatchNorm's checkpoint still loads
    if inplace and not isinstance(norm, FrozenBatchNorm2d):
        for n, before in originals.items():
            if before is not None and not parametrize.is_parametrized(norm, n):
                assert getattr(gn, n) is before  # the very Parameter: an optimizer holding it keeps working


@pytest.mark.parametrize("name", [n for n in NORMS if n.startswith("parametrized")])
def test_parametrization_is_carried_to_group_norm(name: str) -> None:
    make, _ = NORMS[name]
    model = _net(make()).eval()
    norm = model[1]
    chains = {n: norm.parametrizations[n] for n in norm.parametrizations}
    originals = {n: (chain.original, chain.original.detach().clone()) for n, chain in chains.items()}
    report = plan_conversion(model, gn=GROUPS)
    converted = convert_model(model, gn=GROUPS, inplace=True)
    gn = converted[1]

    for n, chain in chains.items():
        assert any(f"parametrization of {n}" in note for note in report.notes), report.notes
        assert parametrize.is_parametrized(gn, n)
        assert gn.parametrizations[n] is chain  # the same parametrization modules apply
        original, data = originals[n]
        assert gn.parametrizations[n].original is original and original.requires_grad
        assert torch.equal(original, data)  # right_inverse was not applied again
        assert_close(getattr(gn, n), chain(), rtol=0, atol=0)
    assert "weight" not in chains or (gn.weight >= 0).all()  # the constraint still holds
    x = torch.randn(2, C, 4, 4)
    gn(x).square().sum().backward()
    for original, _ in originals.values():
        assert original.grad is not None and original.grad.abs().sum() > 0  # trainable through the chain
    with torch.no_grad():
        assert_close(gn(x), _expected_group_norm(gn, x))
        if "weight" in chains:
            originals["weight"][0].copy_(-torch.rand(C))  # a negative original: the weight is still its abs
            assert_close(gn.weight, originals["weight"][0].abs())
    # the BatchNorm's own state dict (parametrized keys, running statistics) loads strictly
    fresh = _net(make())
    converted.load_state_dict(fresh.state_dict(), strict=True)


def test_weight_computed_by_a_hook_is_skipped_in_plan_and_conversion() -> None:
    with pytest.warns(FutureWarning):
        norm = torch.nn.utils.weight_norm(nn.BatchNorm2d(C), "weight", dim=0)  # weight is a plain attribute
    model = _net(norm)
    report = plan_conversion(model, gn=GROUPS)
    (skipped,) = report.skipped
    assert skipped.path == "1" and "weight_norm" in skipped.reason
    converted = convert_model(model, gn=GROUPS, inplace=True)  # (torch cannot deep-copy hook-based weight_norm)
    assert type(converted[1]) is nn.BatchNorm2d and converted[1].weight_g.requires_grad


# --- a failure part way leaves the model as it was ----------------------------------------------------------


class Net(nn.Module):
    """Convs, norms of every rule, shared modules, hooks and a conv with a parametrized bias."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(C)
        self.bn_again = self.bn  # a replaced module with two parent edges
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        parametrize.register_parametrization(self.conv, "bias", Scale())
        self.act_bn = BatchNormAct2d(C)
        self.shared = nn.Conv2d(C, C, 1)
        self.again = self.shared
        self.frozen = FrozenBatchNorm2d(C)
        self.head = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), _without("bias", nn.BatchNorm2d(C)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_bn(self.conv(self.bn(self.stem(x))))
        return self.head(self.frozen(self.again(self.shared(x))))


def _hooked_net() -> nn.Module:
    net = Net()
    for module in (net.bn, net.act_bn, net.frozen, net.head[1]):
        _randomized(module)
    net.bn.register_forward_hook(lambda m, i, o: o * 1.5)
    net.stem.register_forward_pre_hook(lambda m, i: (i[0] + 1.0,))
    net.head[0].register_load_state_dict_post_hook(lambda m, keys: None)
    return net.eval()


def _class_attributes(module: nn.Module) -> list[str]:
    # copy.deepcopy caches __slotnames__ on the class it copies (copyreg), whoever converts the copy
    return sorted(n for n in vars(type(module)) if n != "__slotnames__")


def _state(model: nn.Module, x: torch.Tensor) -> dict:
    """Everything a conversion could change, by path: types, class attributes, tensors' identities, hooks."""
    hooks = {}
    for path, module in model.named_modules():
        hooks[path] = {k: list(v.items()) for k, v in vars(module).items() if "hook" in k and isinstance(v, dict)}
    with torch.no_grad():
        output = model(x)
    return {
        "types": [(path, type(m), _class_attributes(m)) for path, m in model.named_modules(remove_duplicate=False)],
        "children": [(path, id(m)) for path, m in model.named_modules(remove_duplicate=False)],
        "state_dict": list(model.state_dict()),
        "parameters": [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(n, id(b)) for n, b in model.named_buffers(remove_duplicate=False)],
        "hooks": hooks,
        "output": output,
    }


class FailingRules:
    """Make the ``fail_at``-th rule apply (1-based) raise ``error``, before or after the real apply.

    The walker holds ``rules.RULES`` itself as its default table, so the list is patched in place.
    """

    def __init__(self) -> None:
        self.original = list(rules.RULES)
        self.applied: list[str] = []

    def inject(self, fail_at: int, after: bool, error: BaseException) -> None:
        def wrap(rule: rules.Rule) -> rules.Rule:
            def apply(module: nn.Module, decision: rules.Decision, options: object) -> nn.Module:
                self.applied.append(type_name(module))
                if len(self.applied) == fail_at and not after:
                    raise error
                result = rule.apply(module, decision, options)
                if len(self.applied) == fail_at:
                    raise error
                return result

            return dataclasses.replace(rule, apply=apply)

        rules.RULES[:] = [wrap(rule) for rule in self.original]

    def restore(self) -> None:
        rules.RULES[:] = self.original


@pytest.fixture
def failing_rules() -> FailingRules:
    patch = FailingRules()
    yield patch
    patch.restore()


N_APPLIED = 8  # stem, bn, conv, act_bn, shared (once, at two paths), frozen, head.0, head.1


def test_the_failure_table_covers_every_applied_module() -> None:
    assert len(plan_conversion(_hooked_net(), gn=GROUPS).converted) == N_APPLIED


@pytest.mark.parametrize("after", [False, True], ids=["before-apply", "after-apply"])
@pytest.mark.parametrize("fail_at", range(1, N_APPLIED + 1))
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "copy"])
def test_failed_conversion_changes_nothing(
    failing_rules: FailingRules, fail_at: int, after: bool, inplace: bool
) -> None:
    net = _hooked_net()
    x = torch.randn(2, 3, 6, 6)
    before = _state(net, x)
    failing = plan_conversion(net, gn=GROUPS).converted[fail_at - 1]  # apply follows the plan's order
    failing_rules.inject(fail_at, after, RuntimeError("injected"))
    with pytest.raises(WSConvertError, match="injected") as raised:
        convert_model(net, gn=GROUPS, inplace=inplace)
    assert failing_rules.applied[-1] == failing.old_type and len(failing_rules.applied) == fail_at
    assert f"converting {failing.path} ({failing.old_type}" in str(raised.value)
    after_state = _state(net, x)
    for key in ("types", "children", "state_dict", "parameters", "buffers", "hooks"):
        assert after_state[key] == before[key], key
    assert_close(after_state["output"], before["output"], rtol=0, atol=0)
    assert net.conv.weight is net.conv._parameters["weight"]
    net.load_state_dict(_hooked_net().state_dict(), strict=True)
    failing_rules.restore()
    converted = convert_model(net, gn=GROUPS, inplace=inplace)  # and it still converts afterwards
    assert isinstance(converted.bn, nn.GroupNorm)


@pytest.mark.parametrize("fail_at", [2, 25, 40])
def test_failed_conversion_of_a_torchvision_resnet_changes_nothing(failing_rules: FailingRules, fail_at: int) -> None:
    from torchvision.models import resnet18

    net = resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    before = _state(net, x)
    failing_rules.inject(fail_at, True, RuntimeError("injected"))
    with pytest.raises(WSConvertError, match="injected"):
        convert_model(net, gn=GROUPS, inplace=True)
    after_state = _state(net, x)
    assert_close(after_state.pop("output"), before.pop("output"), rtol=0, atol=0)
    assert after_state == before


def test_converting_a_copy_leaves_an_original_with_a_parametrized_bias_working() -> None:
    conv = nn.Conv2d(3, C, 3)
    parametrize.register_parametrization(conv, "bias", Scale())  # its per-module class is shared by deepcopy
    x = torch.randn(1, 3, 5, 5)
    expected = conv(x)
    converted = convert_model(nn.Sequential(conv))
    assert parametrize.is_parametrized(converted[0], "weight") and not parametrize.is_parametrized(conv, "weight")
    assert "weight" not in vars(type(conv)) and conv.weight is conv._parameters["weight"]
    assert_close(conv(x), expected, rtol=0, atol=0)


def test_interrupt_is_undone_and_not_wrapped(failing_rules: FailingRules) -> None:
    net = _hooked_net()
    x = torch.randn(2, 3, 6, 6)
    before = _state(net, x)
    failing_rules.inject(4, True, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convert_model(net, gn=GROUPS, inplace=True)
    after_state = _state(net, x)
    assert {k: v for k, v in after_state.items() if k != "output"} == {k: v for k, v in before.items() if k != "output"}


# --- a plain state dict after torch's own remove_parametrizations --------------------------------------------


@pytest.mark.parametrize("leave_parametrized", [True, False])
def test_plain_state_dict_loads_after_remove_parametrizations(leave_parametrized: bool) -> None:
    converted = convert_model(nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)), gn=GROUPS)
    parametrize.remove_parametrizations(converted[0], "weight", leave_parametrized=leave_parametrized)
    plain = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)).state_dict()
    converted.load_state_dict(plain, strict=True)
    assert_close(converted[0].weight, plain["0.weight"], rtol=0, atol=0)
    converted.load_state_dict(converted.state_dict(), strict=True)


def test_plain_state_dict_still_loads_while_standardized() -> None:
    converted = convert_model(nn.Sequential(nn.Conv2d(3, C, 3)))
    plain = nn.Sequential(nn.Conv2d(3, C, 3)).state_dict()
    converted.load_state_dict(plain, strict=True)
    assert_close(converted[0].parametrizations.weight.original, plain["0.weight"], rtol=0, atol=0)


# --- TorchScript modules are refused -------------------------------------------------------------------------


class Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, C, 3), inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _eager() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)).eval()


SCRIPTED = {
    "script": (lambda: torch.jit.script(_eager()), "the model"),
    "trace": (lambda: torch.jit.trace(_eager(), torch.randn(1, 3, 6, 6)), "the model"),
    "scripted submodule": (lambda: Holder(torch.jit.script(nn.Sequential(nn.Conv2d(C, C, 1)))), "'block.1'"),
}
ENTRY_POINTS = {
    "convert_model": lambda m: convert_model(m, gn=GROUPS),
    "convert_model inplace": lambda m: convert_model(m, gn=GROUPS, inplace=True),
    "plan_conversion": lambda m: plan_conversion(m, gn=GROUPS),
    "bake": bake,
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated:FutureWarning")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", SCRIPTED)
def test_torchscript_modules_are_refused(kind: str, entry: str) -> None:
    make, where = SCRIPTED[kind]
    model = make()
    keys = list(model.state_dict())
    with pytest.raises(UnsupportedModuleError, match="TorchScript") as raised:
        ENTRY_POINTS[entry](model)
    message = str(raised.value)
    assert where in message and "convert the eager model" in message.lower() and "bake" in message
    assert list(model.state_dict()) == keys
