"""convert_model / plan_conversion on hand-built modules: the rules, the walker, options and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, GroupNormAct, ScaledStdConv2d, StdConv2d, StdConv2dSame
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm
from torch.testing import assert_close
from torchvision.ops.misc import FrozenBatchNorm2d

import wsconvert
from wsconvert import (
    InvalidOptionError,
    UnsupportedModuleError,
    WeightStandardization,
    WSConvertError,
    convert_model,
    is_standardized,
    plan_conversion,
)


class Block(nn.Module):
    def __init__(self, cin: int = 3, cout: int = 40) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _randomize_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d, FrozenBatchNormAct2d)):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model


def _ws_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]


# --- what becomes what ---------------------------------------------------------------------------

NORMS = {
    "bn1d": (lambda: nn.BatchNorm1d(40), (2, 40, 5)),
    "bn1d-2d-input": (lambda: nn.BatchNorm1d(40), (2, 40)),
    "bn2d": (lambda: nn.BatchNorm2d(40), (2, 40, 4, 4)),
    "bn3d": (lambda: nn.BatchNorm3d(40), (2, 40, 2, 3, 3)),
    "syncbn": (lambda: nn.SyncBatchNorm(40), (2, 40, 4, 4)),
    "affine-false": (lambda: nn.BatchNorm2d(40, affine=False), (2, 40, 4, 4)),
    "no-running-stats": (lambda: nn.BatchNorm2d(40, track_running_stats=False), (2, 40, 4, 4)),
    "frozen": (lambda: FrozenBatchNorm2d(40, eps=1e-3), (2, 40, 4, 4)),
}


@pytest.mark.parametrize(("make", "shape"), list(NORMS.values()), ids=list(NORMS))
def test_every_batchnorm_becomes_groupnorm_with_its_affine_and_eps(make, shape):
    norm = _randomize_norms(nn.Sequential(make()))
    old = norm[0]
    out = convert_model(norm, gn=32)
    gn = out[0]
    assert type(gn) is nn.GroupNorm
    assert gn.num_groups == 20  # largest divisor of 40 that is <= 32
    assert gn.num_channels == 40
    assert gn.eps == old.eps
    assert gn.affine == (old.weight is not None)
    x = torch.randn(shape)
    expected = torch.nn.functional.group_norm(x, 20, old.weight, old.bias, old.eps)
    assert_close(gn(x), expected)


def test_batchnorm_affine_parameters_are_reused_and_keep_requires_grad():
    model = nn.Sequential(nn.BatchNorm2d(8))
    model[0].bias.requires_grad_(False)
    weight, bias = model[0].weight, model[0].bias
    out = convert_model(model, gn=4, inplace=True)
    assert out[0].weight is weight and out[0].bias is bias
    assert out[0].weight.requires_grad and not out[0].bias.requires_grad


def test_frozen_batchnorm_buffers_become_frozen_parameters():
    model = _randomize_norms(nn.Sequential(FrozenBatchNorm2d(8)))
    out = convert_model(model, gn=4)
    gn = out[0]
    assert isinstance(gn.weight, nn.Parameter) and not gn.weight.requires_grad
    assert_close(gn.weight, model[0].weight)
    assert_close(gn.bias, model[0].bias)


def test_frozen_batchnorm_with_zero_eps_gets_a_safe_eps_and_a_note():
    model = nn.Sequential(FrozenBatchNorm2d(8, eps=0.0))
    report = plan_conversion(model, gn=4)
    assert any("eps 0.0 raised to 1e-05" in note for note in report.notes)
    out = convert_model(model, gn=4)
    assert out[0].eps == 1e-5
    assert torch.isfinite(out(torch.zeros(1, 8, 3, 3))).all()


@pytest.mark.parametrize("make", [BatchNormAct2d, FrozenBatchNormAct2d], ids=["BatchNormAct2d", "FrozenBatchNormAct2d"])
def test_timm_norm_act_keeps_its_activation_and_drop(make):
    norm = make(40, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(0.0))
    model = _randomize_norms(nn.Sequential(norm))
    act, drop = norm.act, norm.drop
    out = convert_model(model, gn=32, inplace=True)[0]
    assert isinstance(out, GroupNormAct)
    assert out.act is act and out.drop is drop
    assert out.num_groups == 20
    x = torch.randn(2, 40, 4, 4)
    expected = nn.functional.silu(nn.functional.group_norm(x, 20, norm.weight, norm.bias, norm.eps))
    assert_close(out(x), expected)


def test_batchnorm_subclass_with_own_forward_is_skipped_not_silently_replaced():
    class ScaledBN(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(ScaledBN(8))
    report = plan_conversion(model, gn=4)
    assert [s.type for s in report.skipped] == ["ScaledBN"]
    assert "overrides forward()" in report.skipped[0].reason
    assert isinstance(convert_model(model, gn=4)[0], ScaledBN)


def test_batchnorm_subclass_without_own_forward_is_converted():
    class TaggedBN(nn.BatchNorm2d):
        pass

    assert type(convert_model(nn.Sequential(TaggedBN(8)), gn=4)[0]) is nn.GroupNorm


@pytest.mark.parametrize(
    ("channels", "requested", "groups"),
    [(64, 32, 32), (40, 32, 20), (37, 32, 1), (16, 32, 16), (72, 32, 24), (3, 1, 1), (96, 32, 32), (7, 7, 7)],
)
def test_group_fallback_is_largest_divisor_not_above_requested(channels, requested, groups):
    model = nn.Sequential(nn.BatchNorm2d(channels))
    report = plan_conversion(model, gn=requested)
    assert convert_model(model, gn=requested)[0].num_groups == groups
    fallbacks = [(f.channels, f.requested, f.groups) for f in report.group_fallbacks]
    assert fallbacks == ([] if groups == requested else [(channels, requested, groups)])


def test_gn_none_keeps_norm_layers_and_reports_them():
    model = Block()
    report = plan_conversion(model)
    out = convert_model(model)
    assert isinstance(out.bn, nn.BatchNorm2d)
    assert [(s.path, s.reason) for s in report.skipped] == [("bn", "norm layer kept (gn not set)")]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: nn.Conv2d(8, 8, 1, groups=8), "fan-in 1"),
        (lambda: nn.Conv1d(4, 4, 1, groups=4), "fan-in 1"),
        (lambda: nn.Conv2d(1, 4, 1), "fan-in 1"),
    ],
)
def test_fan_in_one_convs_are_skipped(make, reason):
    report = plan_conversion(nn.Sequential(make()))
    assert report.converted == []
    assert reason in report.skipped[0].reason


def test_depthwise_is_standardized_unless_skip_depthwise():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 3, groups=2))
    assert len(plan_conversion(model).converted) == 2
    report = plan_conversion(model, skip_depthwise=True)
    assert [c.path for c in report.converted] == ["1"]
    assert report.skipped[0].path == "0" and "depthwise" in report.skipped[0].reason


@pytest.mark.parametrize(
    "make",
    [
        lambda: StdConv2d(4, 8, 3),
        lambda: StdConv2dSame(4, 8, 3),
        lambda: ScaledStdConv2d(4, 8, 3),
    ],
    ids=["StdConv2d", "StdConv2dSame", "ScaledStdConv2d"],
)
def test_timm_standardized_convs_are_not_standardized_twice(make):
    model = nn.Sequential(make())
    report = plan_conversion(model)
    assert report.converted == []
    assert "already weight-standardized" in report.skipped[0].reason
    out = convert_model(model)
    assert not parametrize.is_parametrized(out[0])
    assert is_standardized(out[0])


def test_converting_twice_equals_converting_once():
    model = nn.Sequential(Block(), Block(40, 40))
    once = convert_model(model, gn=32)
    twice = convert_model(once, gn=32)
    report = plan_conversion(once, gn=32)
    assert report.converted == []
    assert all("already weight-standardized (wsconvert)" in s.reason for s in report.skipped)
    assert all(len(m.parametrizations.weight) == 1 for m in _ws_modules(twice))
    x = torch.randn(2, 3, 6, 6)
    assert_close(twice(x), once(x))


def test_conv_with_other_parametrization_is_skipped_with_reason():
    model = nn.Sequential(spectral_norm(nn.Conv2d(3, 4, 3)))
    report = plan_conversion(model)
    assert "already carries a parametrization (_SpectralNorm)" in report.skipped[0].reason
    assert not is_standardized(convert_model(model)[0])


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
def test_deprecated_weight_norm_conv_is_skipped_with_reason():
    model = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3)))
    report = plan_conversion(model)
    assert "weight is not a parameter" in report.skipped[0].reason


@pytest.mark.parametrize("make", [lambda: nn.LazyConv2d(4, 3), lambda: nn.LazyBatchNorm2d()], ids=["conv", "bn"])
def test_uninitialized_lazy_module_raises_and_says_what_to_do(make):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), make())
    with pytest.raises(UnsupportedModuleError, match=r"^1 \(Lazy\w+\) is a lazy module.*run one forward pass"):
        convert_model(model, gn=2)


def test_initialized_lazy_modules_are_converted():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d())
    model(torch.randn(1, 3, 5, 5))
    out = convert_model(model, gn=2)
    assert is_standardized(out[0]) and isinstance(out[1], nn.GroupNorm)


# --- the walker ----------------------------------------------------------------------------------


class Containers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(Block(3, 8), nn.Sequential(Block(8, 8)))
        self.items = nn.ModuleList([Block(8, 8), Block(8, 8)])
        self.named = nn.ModuleDict({"a": Block(8, 8)})

    def forward(self, x):
        x = self.seq(x)
        for item in self.items:
            x = item(x)
        return self.named["a"](x)


def test_nested_containers_are_walked():
    out = convert_model(Containers(), gn=4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())
    assert len(_ws_modules(out)) == 5
    assert torch.isfinite(out(torch.randn(2, 3, 6, 6))).all()


def test_root_module_itself_can_be_replaced():
    out = convert_model(nn.BatchNorm2d(8), gn=4)
    assert type(out) is nn.GroupNorm


def test_shared_module_is_converted_once_and_stays_shared():
    shared_conv = nn.Conv2d(4, 4, 3, padding=1)
    shared_bn = nn.BatchNorm2d(4)
    model = nn.Sequential(shared_conv, shared_bn, shared_conv, shared_bn)
    report = plan_conversion(model, gn=2)
    assert [(c.path, c.also_at) for c in report.converted] == [("0", ("2",)), ("1", ("3",))]
    out = convert_model(model, gn=2)
    assert out[0] is out[2] and out[1] is out[3]
    assert len(out[0].parametrizations.weight) == 1
    assert type(out[1]) is nn.GroupNorm


def test_shared_module_is_converted_only_when_every_path_is_selected():
    shared = Block(4, 4)
    model = nn.ModuleDict({"a": shared, "b": shared})
    report = plan_conversion(model, gn=2, exclude=["b.*"])
    assert report.converted == []
    assert all("excluded by pattern 'b.*' (at b." in s.reason for s in report.skipped)


def test_hooks_are_carried_to_the_replacement_and_handles_still_remove_them():
    model = Block(3, 8)
    calls = []
    h1 = model.bn.register_forward_hook(lambda m, i, o: calls.append("post"))
    model.bn.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    model.bn.register_forward_hook(lambda m, a, k, o: calls.append("kwargs"), with_kwargs=True)
    out = convert_model(model, gn=4, inplace=True)
    out(torch.randn(1, 3, 4, 4))
    assert calls == ["pre", "post", "kwargs"]
    h1.remove()
    calls.clear()
    out(torch.randn(1, 3, 4, 4))
    assert calls == ["pre", "kwargs"]


def test_training_flag_device_dtype_and_qconfig_are_carried():
    model = nn.Sequential(nn.BatchNorm2d(8).double(), nn.BatchNorm2d(8))
    model[0].eval()
    model[1].qconfig = "marker"
    out = convert_model(model, gn=4)
    assert out[0].training is False and out[1].training is True
    assert out[0].weight.dtype == torch.float64
    assert out[1].qconfig == "marker"


def test_meta_device_conversion():
    with torch.device("meta"):
        model = Block(3, 8)
    out = convert_model(model, gn=4)
    assert out.bn.weight.device.type == "meta"
    assert out.conv.weight.device.type == "meta"


def test_conv_weight_parameter_keeps_its_identity_so_old_optimizers_work():
    model = Block(3, 8)
    weight = model.conv.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = convert_model(model, gn=4, inplace=True)
    assert out.conv.parametrizations.weight.original is weight
    before = weight.detach().clone()
    out(torch.randn(2, 3, 4, 4)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(before, weight)


def test_inplace_false_leaves_the_input_untouched():
    model = Block(3, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    convert_model(model, gn=4)
    assert type(model.conv) is nn.Conv2d and type(model.bn) is nn.BatchNorm2d
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_plan_does_not_touch_the_model():
    model = Block(3, 8)
    plan_conversion(model, gn=4)
    assert type(model.conv) is nn.Conv2d and isinstance(model.bn, nn.BatchNorm2d)


# --- include / exclude ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("include", "exclude", "converted"),
    [
        (None, None, ["a.conv", "a.bn", "b.conv", "b.bn"]),
        (None, ["b.*"], ["a.conv", "a.bn"]),
        (["a.*"], None, ["a.conv", "a.bn"]),
        (["*.conv"], None, ["a.conv", "b.conv"]),
        (["*"], ["*.bn"], ["a.conv", "b.conv"]),
        ("a.conv", None, ["a.conv"]),
        (["nothing"], None, []),
    ],
)
def test_include_and_exclude_globs(include, exclude, converted):
    model = nn.Sequential()
    model.add_module("a", Block(3, 8))
    model.add_module("b", Block(8, 8))
    report = plan_conversion(model, gn=4, include=include, exclude=exclude)
    assert [c.path for c in report.converted] == converted
    assert len(report.converted) + len(report.skipped) == 4
    out = convert_model(model, gn=4, include=include, exclude=exclude)
    assert sorted(n for n, m in out.named_modules() if is_standardized(m) or type(m) is nn.GroupNorm) == sorted(
        converted
    )


# --- bad options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gn": 0}, r"gn=0 must be an integer >= 1"),
        ({"gn": -4}, r"gn=-4"),
        ({"gn": 2.5}, r"gn=2.5"),
        ({"gn": "32"}, r"gn='32'"),
        ({"gn": True}, r"gn=True"),
        ({"eps": 0.0}, r"eps=0.0 must be a finite number > 0"),
        ({"eps": float("inf")}, r"eps=inf"),
        ({"style": "Standard"}, r"style='Standard' is not a weight standardization style"),
        ({"include": 5}, r"include=5 must be a list of glob patterns"),
        ({"exclude": [""]}, r"exclude contains ''"),
        ({"exclude": [3]}, r"exclude contains 3"),
        ({"skip_depthwise": "yes"}, r"skip_depthwise='yes'"),
    ],
)
def test_bad_options_raise_invalid_option_error(kwargs, match):
    for function in (convert_model, plan_conversion):
        with pytest.raises(InvalidOptionError, match=match):
            function(Block(), **kwargs)


@pytest.mark.parametrize("model", [None, "resnet18", torch.zeros(3)])
def test_non_module_input_is_rejected(model):
    with pytest.raises(WSConvertError, match="expected a torch.nn.Module"):
        convert_model(model)


def test_errors_are_value_errors():
    assert issubclass(WSConvertError, ValueError)
    assert issubclass(InvalidOptionError, WSConvertError) and issubclass(UnsupportedModuleError, WSConvertError)


def test_uncopyable_model_error_suggests_inplace():
    class NoCopy(Block):
        def __deepcopy__(self, memo):
            raise TypeError("cannot copy a lock")

    with pytest.raises(WSConvertError, match="pass inplace=True"):
        convert_model(NoCopy())
    assert is_standardized(convert_model(NoCopy(), inplace=True).conv)


# --- the report ----------------------------------------------------------------------------------


def test_report_str_and_dict():
    model = nn.Sequential(Block(3, 40), nn.Conv2d(40, 40, 1, groups=40))
    report = plan_conversion(model, gn=32)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["summary"] == {"standardized": 1, "replaced": 1, "skipped": 1, "group_fallbacks": 1}
    assert data["options"]["gn"] == 32
    assert data["converted"][0] == {
        "path": "0.conv",
        "old_type": "Conv2d",
        "new_type": "Conv2d+WS",
        "action": "standardized",
        "also_at": [],
    }
    assert data["group_fallbacks"] == [{"path": "0.bn", "channels": 40, "requested": 32, "groups": 20}]
    text = str(report)
    for expected in ("0.conv", "Conv2d+WS", "GroupNorm(20, 40)", "fan-in 1", "running statistics", "requested"):
        assert expected in text


def test_is_standardized():
    conv = nn.Conv2d(3, 4, 3)
    assert not is_standardized(conv)
    parametrize.register_parametrization(conv, "weight", WeightStandardization())
    assert is_standardized(conv)
    assert not is_standardized(nn.Linear(3, 4))
    assert wsconvert.is_standardized(StdConv2d(3, 4, 3))
