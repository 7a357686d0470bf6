"""The public rule registry (wsconvert.rules): register/scoped rules, helpers, built-in third-party rules, kinds.

Third-party classes are stand-ins whose ``__module__`` / ``__qualname__`` and forward mimic the real ones:
transformers BiT ``WeightStandardizedConv2d`` (models/bit/modeling_bit.py), mmcv ``ConvWS2d`` / ``ConvAWS2d``
(mmcv/cnn/bricks/conv_ws.py), lucidrains' denoising-diffusion-pytorch ``WeightStandardizedConv2d`` and
transformers ``DetrFrozenBatchNorm2d`` (models/detr/modeling_detr.py). timm's CondConv2d is the real one.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import wsconvert
from wsconvert import InvalidOptionError, convert_model, plan_conversion, rules, walk
from wsconvert.options import ConversionOptions
from wsconvert.probes.pooled import norm_values_per_channel
from wsconvert.probes.unnormalized import is_norm_layer, norm_types, probe_unnormalized
from wsconvert.ws.detect import standardization

GN = ConversionOptions.build(gn=4)


@pytest.fixture(autouse=True)
def _isolated():
    with rules.isolated():
        yield


def _named(cls: type, module: str, name: str) -> type:
    cls.__module__, cls.__qualname__, cls.__name__ = module, name, name
    return cls


# --- stand-ins for third-party classes --------------------------------------------------------------


class _BitConv(nn.Conv2d):
    def __init__(self, *args: object, eps: float = 1e-8, **kwargs: object) -> None:
        super().__init__(*args, bias=False, **kwargs)
        self.eps = eps
        self.pad = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _conv_ws_2d(x: torch.Tensor, conv: nn.Conv2d, eps: float = 1e-5) -> torch.Tensor:
    flat = conv.weight.view(conv.out_channels, -1)
    mean = flat.mean(dim=1, keepdim=True).view(-1, 1, 1, 1)
    std = flat.std(dim=1, keepdim=True).view(-1, 1, 1, 1)
    weight = (conv.weight - mean) / (std + eps)
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class _ConvWS(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_ws_2d(x, self)


class _ConvAWS(nn.Conv2d):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_gamma", torch.ones(self.out_channels, 1, 1, 1))
        self.register_buffer("weight_beta", torch.zeros(self.out_channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_ws_2d(x, self) * 1.0


class _LucidrainsConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = self.weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        weight = (self.weight - mean) * (var + eps).rsqrt()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _PlainNamedConv(nn.Conv2d):
    """Named WeightStandardizedConv2d but with torch's own forward: nothing standardizes it."""


BitConv = _named(_BitConv, "transformers.models.bit.modeling_bit", "WeightStandardizedConv2d")
ConvWS2d = _named(_ConvWS, "mmcv.cnn.bricks.conv_ws", "ConvWS2d")
ConvAWS2d = _named(_ConvAWS, "mmcv.cnn.bricks.conv_ws", "ConvAWS2d")
LucidrainsConv = _named(
    _LucidrainsConv, "denoising_diffusion_pytorch.denoising_diffusion_pytorch", "WeightStandardizedConv2d"
)
PlainNamedConv = _named(_PlainNamedConv, "somewhere.models", "WeightStandardizedConv2d")


class _DetrFrozenBN(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.reshape(1, -1, 1, 1)
        bias = self.bias.reshape(1, -1, 1, 1)
        scale = weight * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        return x * scale + (bias - self.running_mean.reshape(1, -1, 1, 1) * scale)


DetrFrozenBatchNorm2d = _named(_DetrFrozenBN, "transformers.models.detr.modeling_detr", "DetrFrozenBatchNorm2d")
ConditionalDetrFrozenBatchNorm2d = _named(
    type("C", (_DetrFrozenBN,), {}),
    "transformers.models.conditional_detr.modeling_conditional_detr",
    "ConditionalDetrFrozenBatchNorm2d",
)


class _WithNumFeatures(_DetrFrozenBN):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.num_features = n


NotDuckFrozen = _named(_WithNumFeatures, "elsewhere", "OtherFrozenBatchNorm2d")


class MyNorm(nn.Module):
    """A custom normalization layer (per-sample over channels and space, like GroupNorm(1, C))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-5) * self.weight.view(1, -1, 1, 1)


class MyConv(nn.Module):
    """A conv-like module that is not a torch _ConvNd."""

    def __init__(self, cin: int, cout: int, groups: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = cin, cout, groups
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, padding=1, groups=self.groups)


class Block(nn.Module):
    def __init__(self, conv: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).relu()


def _frozen(cls: type, n: int = 8) -> nn.Module:
    torch.manual_seed(0)
    bn = cls(n)
    bn.weight.copy_(torch.rand(n) + 0.5)
    bn.bias.copy_(torch.randn(n))
    bn.running_mean.copy_(torch.randn(n))
    bn.running_var.copy_(torch.rand(n) + 0.5)
    return bn


def _skips(report: object) -> dict[str, str]:
    return {s.path: s.reason for s in report.skipped}


# --- built-in third-party standardized convs ----------------------------------------------------------

STANDARDIZED = [
    (BitConv, "WeightStandardizedConv2d"),
    (ConvWS2d, "ConvWS2d"),
    (ConvAWS2d, "ConvAWS2d"),
    (LucidrainsConv, "WeightStandardizedConv2d"),
    (_named(type("Sub", (_ConvWS,), {}), "user.models", "MyConvWS"), "MyConvWS"),  # subclass: MRO match
]


@pytest.mark.parametrize(("cls", "name"), STANDARDIZED, ids=[c.__module__ + "." + n for c, n in STANDARDIZED])
def test_third_party_standardized_convs_are_not_standardized_twice(cls: type, name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(cls(3, 8, 3), nn.GroupNorm(4, 8))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    report = plan_conversion(model, gn=4)
    assert _skips(report) == {"0": f"already weight-standardized ({name})"}
    assert report.converted == []
    converted = convert_model(model, gn=4)
    assert standardization(converted[0]) is None
    assert_close(converted(x), expected)
    assert rules.is_standardized(model[0]) and wsconvert.is_standardized(model[0])


def test_a_conv_named_like_a_standardized_one_with_torchs_forward_is_standardized() -> None:
    model = nn.Sequential(PlainNamedConv(3, 8, 3))
    assert not rules.is_standardized(model[0])
    report = plan_conversion(model)
    assert [(c.path, c.new_type) for c in report.converted] == [("0", "WeightStandardizedConv2d+WS")]


def test_is_standardized_for_wsconvert_timm_and_plain_convs() -> None:
    from timm.layers import StdConv2d

    conv = nn.Conv2d(3, 4, 3)
    assert not rules.is_standardized(conv)
    assert rules.is_standardized(convert_model(nn.Sequential(conv))[0])
    assert rules.is_standardized(StdConv2d(3, 4, 3))
    assert not rules.is_standardized(nn.Linear(3, 4))


# --- DETR-family frozen BatchNorm ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DetrFrozenBatchNorm2d, ConditionalDetrFrozenBatchNorm2d], ids=lambda c: c.__name__)
@pytest.mark.parametrize("gn", [4, 3])  # 3 does not divide 8: the largest divisor below, 2
def test_detr_frozen_batchnorm_becomes_the_group_norm_of_its_buffers(cls: type, gn: int) -> None:
    bn = _frozen(cls)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn)
    report = plan_conversion(model, gn=gn)
    groups = 4 if gn == 4 else 2
    assert [(c.path, c.new_type) for c in report.converted if c.path == "1"] == [("1", f"GroupNorm({groups}, 8)")]
    out = convert_model(model, gn=gn)
    gn_layer = out[1]
    assert type(gn_layer) is nn.GroupNorm and gn_layer.eps == 1e-5 and gn_layer.num_groups == groups
    assert not gn_layer.weight.requires_grad and not gn_layer.bias.requires_grad  # frozen stays frozen
    x = torch.randn(2, 8, 5, 5)
    assert_close(gn_layer(x), F.group_norm(x, groups, bn.weight, bn.bias, 1e-5))


def test_detr_frozen_batchnorm_uses_its_own_eps_when_it_has_one() -> None:
    bn = _frozen(DetrFrozenBatchNorm2d)
    bn.eps = 1e-3
    out = convert_model(nn.Sequential(nn.Conv2d(3, 8, 3), bn), gn=4)
    assert out[1].eps == 1e-3


def test_frozen_batchnorm_lookalikes_outside_the_duck_type_are_kept_and_listed() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _frozen(NotDuckFrozen))
    report = plan_conversion(model, gn=4)
    assert [c.path for c in report.converted] == ["0"]
    reason = _skips(report)["1"]  # never dropped silently (issue 13, point 2)
    assert "looks like a normalization layer (buffers running_mean and running_var)" in reason
    assert "replace_norm('elsewhere.OtherFrozenBatchNorm2d')" in reason
    assert type(convert_model(model, gn=4)[1]) is NotDuckFrozen  # kept as it is


# --- modules that look like norm layers but match no rule: listed as skipped, with the reason --------------


class _RunningStats(nn.Module):
    """BatchNorm statistics buffers, no affine: looks like a norm by its buffers, whatever its name."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean[:, None, None]) * self.running_var[:, None, None].rsqrt()


class _Affine(nn.Module):
    """A per-channel weight and bias (parameters or buffers), no statistics."""

    def __init__(self, n: int, buffers: bool = False, bias: bool = True) -> None:
        super().__init__()
        make = (lambda t: nn.Buffer(t)) if buffers else nn.Parameter
        self.weight = make(torch.ones(n))
        self.bias = make(torch.zeros(n)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = 0 if self.bias is None else self.bias[:, None, None]
        return x * self.weight[:, None, None] + bias


class _LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _lib_class(base: type, name: str, **init: object) -> type:
    """A subclass of ``base`` named ``lib.<name>``, built with ``init`` keyword arguments."""
    body = {"__init__": lambda self, n: base.__init__(self, n, **init)} if init else {}
    return _named(type(name, (base,), body), "lib", name)


NORM_LIKE = [
    # id, module class, listed as skipped?, evidence in the reason
    ("running-stats", _lib_class(_RunningStats, "Whitening"), True, "buffers running_mean and running_var"),
    ("named-batchnorm", _lib_class(_Affine, "MyBatchNorm"), True, "class name 'MyBatchNorm' with a weight"),
    ("named-norm2d-buffers", _lib_class(_Affine, "ChannelNorm2d", buffers=True), True, "'ChannelNorm2d'"),
    ("named-norm1d", _lib_class(_Affine, "TokenNorm1d"), True, "'TokenNorm1d'"),
    ("named-without-bias", _lib_class(_Affine, "ScaleNorm2d", bias=False), False, ""),
    ("affine-other-name", _lib_class(_Affine, "ChannelScale"), False, ""),
    ("layernorm2d-subclass", _lib_class(_LayerNorm2d, "LayerNorm2d"), False, ""),
    ("groupnorm", lambda n: nn.GroupNorm(2, n), False, ""),
    ("instancenorm-with-stats", lambda n: nn.InstanceNorm2d(n, track_running_stats=True), False, ""),
]


@pytest.mark.parametrize(("build", "listed", "evidence"), [c[1:] for c in NORM_LIKE], ids=[c[0] for c in NORM_LIKE])
@pytest.mark.parametrize("gn", [None, 4])
def test_norm_like_module_matching_no_rule_is_listed_as_skipped(build, listed: bool, evidence: str, gn) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), build(8))
    report = plan_conversion(model, gn=gn)
    skips = _skips(report)
    assert ("1" in skips) == listed, skips
    if listed:
        assert evidence in skips["1"] and "no wsconvert rule matches" in skips["1"]
        assert "wsconvert.rules.register(wsconvert.rules.replace_norm('lib." in skips["1"]
        assert "declare_norm" in skips["1"]
        assert not rules.is_norm(model[1])  # not counted as a norm layer by the probe either
        assert [u.path for u in report.unnormalized] == ["0"]
        assert type(convert_model(model, gn=gn)[1]) is type(model[1])


def test_a_rule_or_declaration_for_a_norm_like_module_replaces_the_listing() -> None:
    Whitening = _lib_class(_RunningStats, "Whitening")  # noqa: N806
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Whitening(8))
    keep_it = rules.keep(Whitening, reason="kept on purpose")
    assert _skips(plan_conversion(model, rules=[keep_it]))["1"] == "kept on purpose"
    with rules.isolated():
        rules.declare_norm(Whitening)
        report = plan_conversion(model, gn=4)
        assert "1" not in _skips(report) and report.unnormalized == []


def test_detr_frozen_batchnorm_with_bcn_is_kept_with_a_reason() -> None:
    report = plan_conversion(nn.Sequential(nn.Conv2d(3, 8, 3), _frozen(DetrFrozenBatchNorm2d)), gn=4, norm="bcn")
    assert "norm='bcn' cannot build a BatchChannelNorm from a DetrFrozenBatchNorm2d" in _skips(report)["1"]


def test_detr_frozen_batchnorm_is_a_norm_layer_for_the_probe() -> None:
    model = Block(nn.Conv2d(3, 8, 3), _frozen(DetrFrozenBatchNorm2d))
    assert rules.is_norm(model.norm) and is_norm_layer(model.norm)
    assert probe_unnormalized(model).normalized == ("conv",)


# --- timm CondConv2d (the real class) ------------------------------------------------------------------


def test_timm_cond_conv_is_listed_as_skipped_with_the_reason() -> None:
    from timm.layers import CondConv2d

    class Routed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.route = nn.Linear(3, 4)
            self.conv = CondConv2d(3, 8, 3, padding=1, num_experts=4)
            self.norm = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x, torch.sigmoid(self.route(x.mean((2, 3))))))

    model = Routed()
    x = torch.randn(2, 3, 6, 6)
    report = plan_conversion(model, gn=4)
    reason = _skips(report)["conv"]
    assert reason.startswith("timm CondConv2d: ") and "not standardize" in reason
    converted = convert_model(model, gn=4)
    assert converted.conv.weight.shape == (4, 8 * 3 * 3 * 3) and standardization(converted.conv) is None
    assert converted(x).shape == (2, 8, 6, 6)


# --- register / unregister / registered / defaults ------------------------------------------------------


class SubConv(nn.Conv2d):
    pass


def test_register_and_unregister_change_every_later_conversion() -> None:
    model = nn.Sequential(SubConv(3, 8, 3))
    rule = rules.already_standardized(SubConv, reason="standardized by hand")
    assert rules.register(rule) is rule
    assert rules.registered() == [rule]
    assert _skips(plan_conversion(model)) == {"0": "standardized by hand"}
    assert rules.is_standardized(model[0])
    rules.unregister(rule)
    assert rules.registered() == []
    assert [c.new_type for c in plan_conversion(model).converted] == ["SubConv+WS"]


def test_register_twice_is_a_no_op_and_first_orders_registered_rules() -> None:
    a = rules.keep(SubConv, reason="a")
    b = rules.keep(SubConv, reason="b")
    c = rules.keep(SubConv, reason="c")
    rules.register(a)
    rules.register(b)  # first=True: before a
    rules.register(c, first=False)  # after a and b
    rules.register(a)
    assert rules.registered() == [b, a, c]
    assert _skips(plan_conversion(nn.Sequential(SubConv(3, 8, 3)))) == {"0": "b"}
    assert rules.resolve()[:3] == (b, a, c) and rules.resolve()[3:] == tuple(rules.defaults())


def test_registered_is_a_copy() -> None:
    rule = rules.register(rules.keep(SubConv, reason="kept"))
    rules.registered().clear()
    assert rules.registered() == [rule]


def test_defaults_is_a_copy_of_the_built_ins() -> None:
    before = rules.resolve()
    copy = rules.defaults()
    assert copy == list(rules.RULES) and copy is not rules.RULES
    copy.clear()
    copy.append(rules.keep(nn.Conv2d, reason="never"))
    assert rules.resolve() == before
    assert [c.new_type for c in plan_conversion(nn.Sequential(nn.Conv2d(3, 8, 3))).converted] == ["Conv2d+WS"]


def test_isolated_undoes_registrations_and_declarations() -> None:
    with rules.isolated():
        rules.register(rules.keep(SubConv, reason="kept"))
        rules.declare_norm(MyNorm)
        rules.declare_conv(MyConv)
    assert rules.registered() == [] and rules.declared("norm") == () and rules.declared("conv") == ()


# --- scoped rules -------------------------------------------------------------------------------------


def _bn_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))


def test_scoped_rules_through_the_walker_beat_built_ins() -> None:
    keep_conv = rules.keep(nn.Conv2d, reason="kept by the user")
    steps = walk.plan(_bn_model(), GN, rules.resolve([keep_conv]))
    assert [(s.site.paths[0], s.decision.action, s.decision.reason) for s in steps] == [
        ("0", "skip", "kept by the user"),
        ("1", "replace", ""),
    ]
    assert [s.decision.action for s in walk.plan(_bn_model(), GN, rules.resolve())] == ["standardize", "replace"]


def test_scoped_rules_beat_registered_rules() -> None:
    rules.register(rules.keep(nn.Conv2d, reason="registered"))
    steps = walk.plan(_bn_model(), GN, rules.resolve([rules.keep(nn.Conv2d, reason="scoped")]))
    assert steps[0].decision.reason == "scoped"


def test_convert_model_rules_apply_to_that_call_only() -> None:
    """Needs convert_model(rules=...) / plan_conversion(rules=...) (engineer C)."""
    keep_conv = rules.keep(nn.Conv2d, reason="kept by the user")
    assert _skips(plan_conversion(_bn_model(), gn=4, rules=[keep_conv])) == {"0": "kept by the user"}
    out = convert_model(_bn_model(), gn=4, rules=[keep_conv])
    assert standardization(out[0]) is None and isinstance(out[1], nn.GroupNorm)
    assert standardization(convert_model(_bn_model(), gn=4)[0]) is not None
    assert rules.registered() == []


def test_replace_norm_with_build_constructs_something_else() -> None:
    """Needs convert_model(rules=...) (engineer C)."""

    def build(module: nn.Module, decision: rules.Decision, options: ConversionOptions) -> nn.Module:
        return nn.LayerNorm(decision.channels, eps=decision.eps)

    rule = rules.replace_norm(nn.BatchNorm2d, build=build, becomes="LayerNorm")
    report = plan_conversion(_bn_model(), gn=4, rules=[rule])
    assert [c.new_type for c in report.converted] == ["Conv2d+WS", "LayerNorm(4, 8)"]
    assert isinstance(convert_model(_bn_model(), gn=4, rules=[rule])[1], nn.LayerNorm)


# --- bad input ----------------------------------------------------------------------------------------

GOOD = rules.keep(nn.Conv2d, reason="kept")

BAD_RULES = [
    ([GOOD, "x"], "rules[1]: 'x' (str) is not a wsconvert.rules.Rule"),
    ([None], "rules[0]: None (NoneType) is not a wsconvert.rules.Rule"),
    (GOOD, "is one Rule; pass a list of rules: rules=[rule]"),
    ("convolution", "must be a list of wsconvert.rules.Rule"),
    (3, "must be a list of wsconvert.rules.Rule"),
    ({GOOD}, "must be an ordered list"),
]


@pytest.mark.parametrize(("value", "message"), BAD_RULES, ids=[m for _, m in BAD_RULES])
def test_resolve_rejects_what_is_not_a_list_of_rules(value: object, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=re.escape(message)):
        rules.resolve(value)


def test_convert_model_rejects_bad_rules() -> None:
    """Needs convert_model(rules=...) (engineer C)."""
    with pytest.raises(InvalidOptionError, match=r"rules\[0\]: 'conv'"):
        convert_model(_bn_model(), rules=["conv"])


BAD_CALLS = [
    (lambda: rules.register("rule"), "wsconvert.rules.register: 'rule' (str) is not a wsconvert.rules.Rule"),
    (lambda: rules.unregister(GOOD), "rule 'kept (Conv2d)' is not registered"),
    (lambda: rules.already_standardized(), "give the module types it handles"),
    (lambda: rules.already_standardized(3), "3 (int) is neither a class nor a dotted class name"),
    (lambda: rules.standardize("Conv2d"), "'Conv2d' is not a dotted class name"),
    (lambda: rules.standardize("a..b"), "'a..b' is not a dotted class name"),
    (lambda: rules.standardize(nn.Conv2d, match=3), "match=3 is not callable"),
    (lambda: rules.replace_norm(nn.BatchNorm2d, eps=0), "eps=0 must be a positive number"),
    (lambda: rules.replace_norm(nn.BatchNorm2d, eps=True), "eps=True must be a positive number"),
    (lambda: rules.replace_norm(nn.BatchNorm2d, build="gn"), "build='gn' is not callable"),
    (lambda: rules.replace_norm(nn.BatchNorm2d, becomes=""), "becomes='' must be a non-empty string"),
    (lambda: rules.keep(nn.Conv2d, reason=""), "reason='' must say why"),
    (lambda: rules.Rule("r", 3, GOOD.decide, GOOD.apply), "Rule 'r': matches=3 is not callable"),
    (lambda: rules.Rule("", GOOD.matches, GOOD.decide, GOOD.apply), "the name must be a non-empty string"),
    (lambda: rules.Rule("r", GOOD.matches, GOOD.decide, GOOD.apply, kind="bn"), "kind='bn' must be one of"),
    (lambda: rules.Decision("convert"), "Decision(action='convert'): the action must be one of"),
    (lambda: rules.declare_norm(), "give at least one class"),
    (lambda: rules.declare_norm("MyNorm"), "'MyNorm' is not a dotted class name"),
    (lambda: rules.declare_conv(1.5), "1.5 (float) is neither a class"),
    (lambda: rules.undeclare(MyNorm), "was not declared a norm or conv type"),
    (lambda: rules.declared("bn"), "kind='bn' must be 'norm' or 'conv'"),
]


@pytest.mark.parametrize(("call", "message"), BAD_CALLS, ids=[m for _, m in BAD_CALLS])
def test_bad_helper_and_registry_input_is_rejected(call: object, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=re.escape(message)):
        call()


# --- helpers --------------------------------------------------------------------------------------------


def test_standardize_helper_parametrizes_a_conv_like_module() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MyConv(4, 8, groups=2), nn.GroupNorm(4, 8))
    x = torch.randn(2, 4, 6, 6)
    assert plan_conversion(model).converted == []  # not a _ConvNd: no built-in rule
    rules.register(rules.standardize(MyConv))
    report = plan_conversion(model)
    assert [(c.path, c.new_type) for c in report.converted] == [("0", "MyConv+WS")]
    out = convert_model(model)
    w_hat = wsconvert.standardize_weight(model[0].weight, 1e-5, groups=2)
    assert_close(out[0].weight, w_hat)
    assert_close(out(x), model[1](F.conv2d(x, w_hat, padding=1, groups=2)))
    assert rules.is_conv(model[0])  # a rule of kind "conv" matches it


def test_standardize_helper_skips_a_module_that_is_not_conv_like() -> None:
    rules.register(rules.standardize(nn.Linear))
    assert _skips(plan_conversion(nn.Sequential(nn.Linear(3, 4)))) == {
        "0": "Linear has no integer in_channels, out_channels, groups: the standardize rule needs a conv-like "
        "module (weight of shape (out, in/groups, *kernel))"
    }


def test_replace_norm_helper_on_a_custom_batchnorm_like_layer() -> None:
    class MyFrozen(_DetrFrozenBN):
        pass

    bn = _frozen(MyFrozen)
    bn.eps = 1e-4
    rules.register(rules.replace_norm(MyFrozen))
    out = convert_model(nn.Sequential(nn.Conv2d(3, 8, 3), bn), gn=2)
    x = torch.randn(2, 8, 4, 4)
    assert_close(out[1](x), F.group_norm(x, 2, bn.weight, bn.bias, 1e-4))
    assert _skips(plan_conversion(nn.Sequential(bn))) == {"0": "norm layer kept (gn not set)"}


def test_helpers_match_by_type_and_predicate() -> None:
    rule = rules.keep(nn.Conv2d, match=lambda m: m.out_channels == 8, reason="eight")
    assert rule.matches(nn.Conv2d(3, 8, 1)) and not rule.matches(nn.Conv2d(3, 4, 1))
    assert not rule.matches(nn.Linear(3, 8))
    dotted = rules.keep("torch.nn.modules.conv.Conv2d", reason="dotted")
    assert (
        dotted.matches(nn.Conv2d(3, 8, 1))
        and dotted.matches(SubConv(3, 8, 1))
        and not dotted.matches(nn.Conv1d(3, 8, 1))
    )


# --- norm / conv kinds for the probes --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fx", "hooks"])
@pytest.mark.parametrize("declare", ["class", "dotted"])
def test_declared_norm_type_is_seen_by_the_probe(method: str, declare: str) -> None:
    model = Block(nn.Conv2d(3, 8, 3), MyNorm(8))
    x = torch.randn(1, 3, 8, 8)
    before = probe_unnormalized(model, x, method=method)
    assert list(before.unnormalized) == ["conv"]  # MyNorm's own ops (sub, std) consume the conv's output
    rules.declare_norm(MyNorm if declare == "class" else f"{MyNorm.__module__}.{MyNorm.__qualname__}")
    after = probe_unnormalized(model, x, method=method)
    assert after.unnormalized == {} and after.normalized == ("conv",)
    assert rules.is_norm(model.norm) and is_norm_layer(model.norm)
    assert MyNorm in norm_types()  # a dotted name is a type once its module is imported (this one is)


def test_scoped_norm_rule_is_seen_by_the_probe_and_the_pooled_check() -> None:
    model = Block(nn.Conv2d(3, 8, 3), MyNorm(8))
    x = torch.randn(1, 3, 8, 8)
    scoped = [rules.keep(MyNorm, reason="custom norm", kind="norm")]
    assert probe_unnormalized(model, x, rules=scoped).normalized == ("conv",)
    assert list(probe_unnormalized(model, x).unnormalized) == ["conv"]  # the rule was for that call only
    assert norm_values_per_channel(model, x, rules=scoped) == ({"norm": 36}, "")
    assert norm_values_per_channel(model, x) == ({}, "")


def test_declared_conv_type_is_seen_by_the_probe() -> None:
    model = nn.Sequential(MyConv(3, 8), nn.SiLU())
    assert probe_unnormalized(model).method == "fx" and probe_unnormalized(model).unnormalized == {}
    rules.declare_conv(MyConv)
    assert probe_unnormalized(model).unnormalized == {"0": "SiLU"}
    rules.undeclare(MyConv)
    assert not rules.is_conv(model[0])


@pytest.mark.parametrize("method", ["fx", "hooks"])
def test_scoped_conv_rule_is_seen_by_the_probe(method: str) -> None:
    model = nn.Sequential(MyConv(3, 8), nn.SiLU())
    x = torch.randn(1, 3, 8, 8)
    scoped = [rules.keep(MyConv, reason="a conv-like layer", kind="conv")]
    found = probe_unnormalized(model, x, method=method, rules=scoped).unnormalized
    assert {path: feeds.lower() for path, feeds in found.items()} == {"0": "silu"}  # hooks see F.silu
    assert probe_unnormalized(model, x, method=method).method == ("fx" if method == "fx" else "hooks")
    assert probe_unnormalized(model, x, method=method).unnormalized == {}  # that call's rule only


KINDS = [
    (nn.Conv2d(3, 4, 1), False, True),
    (nn.ConvTranspose2d(3, 4, 1), False, True),
    (nn.BatchNorm2d(4), True, False),
    (nn.GroupNorm(2, 4), True, False),
    (nn.LayerNorm(4), True, False),
    (nn.Linear(3, 4), False, False),
    (BitConv(3, 4, 1), False, True),
    (DetrFrozenBatchNorm2d(4), True, False),
    (MyNorm(4), False, False),
    (MyConv(3, 4), False, False),
]


@pytest.mark.parametrize(("module", "norm", "conv"), KINDS, ids=[type(m).__name__ for m, _, _ in KINDS])
def test_is_norm_and_is_conv(module: nn.Module, norm: bool, conv: bool) -> None:
    assert (rules.is_norm(module), rules.is_conv(module)) == (norm, conv)


def test_a_decide_that_returns_no_decision_is_a_clear_error() -> None:
    bad = rules.Rule("returns a string", matches=lambda m: isinstance(m, nn.Conv2d), decide=lambda m, p, o: "skip",
                     apply=lambda m, d, o: m)  # fmt: skip
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(wsconvert.WSConvertError, match=r"rule 'returns a string' decided str 'skip' for 0 \(Conv2d\)"):
        plan_conversion(model, rules=[bad])


def test_check_conversion_sees_a_third_party_conv_standardized_again() -> None:
    from torch.nn.utils import parametrize

    from wsconvert.testing import ConversionCheckError, check_conversion
    from wsconvert.ws.standardize import WeightStandardization

    model = nn.Sequential(_BitConv(3, 4, 3), nn.ReLU())
    converted = convert_model(model)
    assert standardization(converted[0]) is None  # the built-in rule skipped it
    broken = convert_model(model)
    conv = broken[0]
    parametrize.register_parametrization(conv, "weight", WeightStandardization.for_conv(conv, 1e-5, "standard"))
    check_conversion(model, converted, torch.randn(1, 3, 8, 8))
    with pytest.raises(ConversionCheckError, match="0: WeightStandardizedConv2d standardized again"):
        check_conversion(model, broken, torch.randn(1, 3, 8, 8))
