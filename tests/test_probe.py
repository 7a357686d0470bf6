"""The unnormalized-conv probe (wsconvert.probes.unnormalized) and its use by plan_conversion / convert_model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torchvision import models
from torchvision.ops.misc import FrozenBatchNorm2d

from wsconvert import InvalidOptionError, convert_model, plan_conversion
from wsconvert.probes.unnormalized import ProbeResult, is_norm_layer, probe_unnormalized

X = torch.randn(2, 4, 8, 8)


class SEBlock(nn.Module):
    """conv -> BN -> ReLU, then a squeeze-excitation gate: avgpool -> conv -> ReLU -> conv -> sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.reduce = nn.Conv2d(8, 2, 1)
        self.expand = nn.Conv2d(2, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class Chain(nn.Module):
    """conv -> (a chain of functions) -> optional norm; the output goes to a final linear map."""

    def __init__(self, between: object, norm: nn.Module | None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.between = between
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.between(self.conv(x))).mean()


class ConvThenFunctionalNorm(nn.Module):
    def __init__(self, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.norm == "group_norm":
            return F.group_norm(y, 4)
        if self.norm == "layer_norm":
            return F.layer_norm(y.permute(0, 2, 3, 1), (8,))
        return F.instance_norm(y)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; a conv feeding a BatchNorm and a head conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            y = y.relu()
        return self.head(y)


class TwoInputs(Untraceable):
    """Untraceable and needs a second argument: a synthetic input (one tensor) cannot run it."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x * scale)


class SharedConv(nn.Module):
    """One conv called twice: once before a BatchNorm, once as the model output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(self.conv(x)))


class WithUnusedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.unused = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class StoresInForward(nn.Module):
    """Assigns an attribute in forward: tracing must not leave an fx Proxy behind."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = self.conv(x)
        return self.bn(self.last)


def _probe(model: nn.Module, method: str) -> ProbeResult:
    result = probe_unnormalized(model, X if method == "hooks" else None, method=method)
    assert result.method == method, result.detail
    return result


METHODS = ["fx", "hooks"]


@pytest.mark.parametrize("method", METHODS)
def test_se_block_gate_convs_are_unnormalized(method: str) -> None:
    result = _probe(SEBlock(), method)
    assert result.normalized == ("conv",)
    assert set(result.unnormalized) == {"reduce", "expand"}
    assert "sigmoid" in result.unnormalized["expand"]
    # reduce -> ReLU is scale-preserving; what follows is the expand conv
    assert result.unnormalized["reduce"] == "Conv2d"


def _relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


CHAINS = [
    # (id, between, norm, normalized?, consumer when not)
    ("conv-bn", nn.Identity(), nn.BatchNorm2d(8), True, None),
    ("conv-relu-bn", nn.ReLU(), nn.BatchNorm2d(8), True, None),
    ("conv-inplace-relu-bn", nn.ReLU(inplace=True), nn.BatchNorm2d(8), True, None),
    ("conv-maxpool-dropout-gn", nn.Sequential(nn.MaxPool2d(2), nn.Dropout(0.1)), nn.GroupNorm(2, 8), True, None),
    ("conv-frozenbn", nn.Identity(), FrozenBatchNorm2d(8), True, None),
    ("conv-zeropad-bn", nn.ConstantPad2d(1, 0.0), nn.BatchNorm2d(8), True, None),
    ("conv-reflectpad-bn", nn.ReflectionPad2d(1), nn.BatchNorm2d(8), True, None),
    ("conv-onepad-bn", nn.ConstantPad2d(1, 1.0), nn.BatchNorm2d(8), False, "pad"),
    ("conv-F.pad-bn", lambda y: F.pad(y, (1, 1, 1, 1)), nn.BatchNorm2d(8), True, None),
    ("conv-F.pad-one-bn", lambda y: F.pad(y, (1, 1, 1, 1), value=1.0), nn.BatchNorm2d(8), False, "pad"),
    ("conv-instancenorm", nn.Identity(), nn.InstanceNorm2d(8), True, None),
    ("conv-sigmoid-bn", nn.Sigmoid(), nn.BatchNorm2d(8), False, "igmoid"),
    ("conv-silu-bn", nn.SiLU(), nn.BatchNorm2d(8), False, "silu"),
    ("conv-hardtanh-bn", nn.Hardtanh(), nn.BatchNorm2d(8), False, "ardtanh"),
    ("conv-mean-output", nn.Identity(), None, False, "model output"),  # mean is scale-preserving
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("between", "norm", "normalized", "consumer"), [c[1:] for c in CHAINS], ids=[c[0] for c in CHAINS]
)
def test_chains(method: str, between: nn.Module, norm: nn.Module | None, normalized: bool, consumer: str) -> None:
    result = _probe(Chain(between, norm), method)
    if normalized:
        assert result.normalized == ("conv",) and result.unnormalized == {}
    else:
        assert list(result.unnormalized) == ["conv"]
        assert consumer in result.unnormalized["conv"].lower() or consumer in result.unnormalized["conv"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("norm", ["group_norm", "layer_norm", "instance_norm"])
def test_functional_norms_count(method: str, norm: str) -> None:
    result = _probe(ConvThenFunctionalNorm(norm), method)
    assert result.normalized == ("conv",)


@pytest.mark.parametrize("method", METHODS)
def test_output_head_and_shared_conv(method: str) -> None:
    head = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 1))
    result = _probe(head, method)
    assert result.normalized == ("0",)
    assert result.unnormalized == {"3": "model output"}
    # a conv used twice is normalized only if every call is
    assert _probe(SharedConv(), method).unnormalized == {"conv": "model output"}


@pytest.mark.parametrize("method", METHODS)
def test_residual_add_and_concat(method: str) -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(torch.cat([self.a(x), x], dim=1))  # concat keeps each channel's scale: normalized
            return self.bn2(self.b(x) + x) + y.mean()  # a sum with another tensor is not scale-preserving

    result = _probe(Block(), method)
    assert result.normalized == ("a",)
    assert result.unnormalized == {"b": "add"}


def test_untraceable_model_falls_back_to_hooks() -> None:
    result = probe_unnormalized(Untraceable(), X)
    assert result.method == "hooks"
    assert "torch.fx cannot trace" in result.detail
    assert result.normalized == ("conv",)
    assert result.unnormalized == {"head": "model output"}
    # fx alone cannot do it
    assert probe_unnormalized(Untraceable(), method="fx").method == "unavailable"


def test_neither_method_works_is_reported_not_raised() -> None:
    model = Untraceable()
    no_input = probe_unnormalized(model)
    assert no_input.method == "unavailable" and not no_input.available
    assert "torch.fx cannot trace" in no_input.detail and "example_inputs" in no_input.detail

    wrong_input = probe_unnormalized(model, torch.randn(1, 3, 8, 8))  # 3 channels for a 4-channel conv
    assert wrong_input.method == "unavailable"
    assert "forward pass on example_inputs failed (RuntimeError" in wrong_input.detail
    assert model.training  # flags restored after the failed forward

    model = TwoInputs()  # a synthetic input cannot run it either
    with pytest.warns(UserWarning, match="skip_unnormalized=True skipped nothing"):
        report = plan_conversion(model, gn=4, skip_unnormalized=True)
    assert report.unnormalized == [] and report.unnormalized_detection.startswith("unavailable: ")
    assert "detection unavailable" in str(report)
    assert any("skip_unnormalized=True skipped nothing" in note for note in report.notes)
    with pytest.warns(UserWarning, match="skip_unnormalized=True skipped nothing"):
        converted = convert_model(model, gn=4, skip_unnormalized=True)
    assert parametrize.is_parametrized(converted.head)


def test_hook_probe_restores_mode_and_changes_nothing() -> None:
    model = SEBlock().train()
    model.bn.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe_unnormalized(model, X, method="hooks")
    assert model.training and not model.bn.training
    after = model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_fx_trace_leaves_no_proxy_on_the_model() -> None:
    model = StoresInForward()
    assert probe_unnormalized(model).normalized == ("conv",)
    assert model.last is None


@pytest.mark.parametrize("method", METHODS)
def test_unreached_conv_is_listed_and_noted(method: str) -> None:
    result = _probe(WithUnusedConv(), method)
    assert result.unreached == ("unused",) and result.unnormalized == {}
    report = plan_conversion(WithUnusedConv())
    assert any("did not run during the unnormalized-conv probe (unused)" in n for n in report.notes)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidOptionError, match="skip_unnormalized='yes'"):
        plan_conversion(SEBlock(), skip_unnormalized="yes")
    with pytest.raises(InvalidOptionError, match="method='trace'"):
        probe_unnormalized(SEBlock(), method="trace")
    with pytest.raises(InvalidOptionError, match="pass example_inputs"):
        probe_unnormalized(SEBlock(), method="hooks")


def test_model_without_convs() -> None:
    result = probe_unnormalized(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))
    assert result.available and result.unnormalized == {} and result.normalized == ()


def test_report_lists_and_skip_unnormalized_skips() -> None:
    report = plan_conversion(SEBlock(), gn=4)
    assert [(u.path, u.type) for u in report.unnormalized] == [("reduce", "Conv2d"), ("expand", "Conv2d")]
    assert report.unnormalized_detection == "torch.fx trace"
    assert {c.path for c in report.converted} >= {"conv", "reduce", "expand", "bn"}
    text = str(report)
    assert "Output feeds no normalization layer (found by torch.fx trace):" in text and "sigmoid" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert [u["path"] for u in data["unnormalized"]] == ["reduce", "expand"]
    assert data["options"]["skip_unnormalized"] is False

    skipping = plan_conversion(SEBlock(), gn=4, skip_unnormalized=True)
    reasons = {s.path: s.reason for s in skipping.skipped}
    assert set(reasons) == {"reduce", "expand"}
    assert reasons["expand"].startswith("output feeds no normalization layer (sigmoid")

    model = convert_model(SEBlock(), gn=4, skip_unnormalized=True)
    assert parametrize.is_parametrized(model.conv)
    assert not parametrize.is_parametrized(model.reduce) and not parametrize.is_parametrized(model.expand)
    assert isinstance(model.bn, nn.GroupNorm)


def test_skip_unnormalized_with_example_inputs_on_untraceable_model() -> None:
    model = convert_model(Untraceable(), skip_unnormalized=True, example_inputs=(X,))
    assert parametrize.is_parametrized(model.conv) and not parametrize.is_parametrized(model.head)
    report = plan_conversion(Untraceable(), example_inputs=X)
    assert report.unnormalized_detection.startswith("forward hooks on the example input")


class WritesIntoItsInputList(nn.Module):
    """pytorchvideo SlowFast's pathway fusion: the forward replaces the entries of the list it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, paths: list[torch.Tensor]) -> torch.Tensor:
        if paths[0].shape[1] != 3:
            raise RuntimeError(f"expected 3 channels, got {paths[0].shape[1]}")
        paths[0] = self.bn(self.conv(paths[0]))
        return paths[0]


def test_probe_forward_leaves_the_example_input_containers_as_they_were() -> None:
    """A model that writes into its input list must not change the user's example_inputs (a second conversion
    with the same input would otherwise probe on feature maps and fail)."""
    x = torch.randn(2, 3, 8, 8)
    paths = [x]
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed probe forward would warn
            report = plan_conversion(WritesIntoItsInputList(), gn=4, example_inputs=(paths,))
        assert paths[0] is x
        assert report.unnormalized_detection.startswith(("torch.fx", "forward hooks on the example input"))


def test_converted_model_probes_the_same() -> None:
    """The GroupNorm produced by conversion counts as a norm; WS-parametrized convs are still convs."""
    model = SEBlock()
    converted = convert_model(model, gn=4)
    for method in METHODS:
        assert _probe(converted, method).unnormalized == _probe(model, method).unnormalized
        assert _probe(converted, method).normalized == ("conv",)


def test_efficientnet_b0_squeeze_excitation_convs() -> None:
    model = models.efficientnet_b0(weights=None)
    se = {p for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and p.rsplit(".", 1)[-1] in ("fc1", "fc2")}
    assert len(se) == 32
    by_fx = probe_unnormalized(model)
    by_hooks = probe_unnormalized(model, torch.randn(1, 3, 32, 32), method="hooks")
    for result in (by_fx, by_hooks):
        assert set(result.unnormalized) == se
        assert all("sigmoid" in result.unnormalized[p].lower() for p in se if p.endswith("fc2"))
    assert by_fx.normalized == by_hooks.normalized


def test_deeplabv3_head_convs() -> None:
    model = models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True)
    by_fx = probe_unnormalized(model)
    assert by_fx.method == "fx"
    assert by_fx.unnormalized == {"classifier.4": "model output", "aux_classifier.4": "model output"}
    # the heads are upsampled (interpolate is scale-preserving) and returned
    by_hooks = probe_unnormalized(model, torch.randn(1, 3, 32, 32), method="hooks")
    assert by_hooks.unnormalized == by_fx.unnormalized
    assert (
        len(by_fx.normalized) == len(by_hooks.normalized) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) - 2
    )


def test_detection_model_needs_hooks_and_finds_heads() -> None:
    model = models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    report = plan_conversion(model, gn=32, example_inputs=([torch.rand(3, 64, 64)],))
    assert report.unnormalized_detection.startswith("forward hooks on the example input")
    flagged = {u.path for u in report.unnormalized}
    assert {"rpn.head.cls_logits", "rpn.head.bbox_pred"} <= flagged
    assert "backbone.body.0.0" not in flagged  # stem conv -> FrozenBatchNorm2d


def test_timm_norm_act_and_se() -> None:
    import timm

    model = timm.create_model("mobilenetv3_small_050", pretrained=False)
    result = probe_unnormalized(model, torch.randn(1, 3, 32, 32))
    se = {p for p, m in model.named_modules() if p.endswith(("se.conv_reduce", "se.conv_expand"))}
    assert se and se <= set(result.unnormalized)
    assert "conv_stem" in result.normalized  # conv_stem -> BatchNormAct2d
    assert is_norm_layer(model.bn1)


def test_conv_feeding_two_branches_norm_and_not() -> None:
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.conv(x)
            return self.bn(y), torch.tanh(y)

    for method in METHODS:
        assert _probe(Fork(), method).unnormalized == {"conv": "tanh"}


def test_no_warning_without_skip() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_conversion(Untraceable())
        convert_model(Untraceable())


def test_input_shape_builds_the_probe_input() -> None:
    report = plan_conversion(Untraceable(), input_shape=[2, 4, 8, 8])
    assert report.unnormalized_detection.startswith("forward hooks on the example input")
    assert [u.path for u in report.unnormalized] == ["head"]
    model = convert_model(Untraceable().double(), skip_unnormalized=True, input_shape=(1, 4, 8, 8))
    assert not parametrize.is_parametrized(model.head) and parametrize.is_parametrized(model.conv)


@pytest.mark.parametrize("shape", [[], "1,4,8,8", [1, 0, 8], [1, 4.0, 8], [True, 4], 5])
def test_bad_input_shape(shape: object) -> None:
    with pytest.raises(InvalidOptionError, match="input_shape=.* must be a non-empty list of positive integers"):
        plan_conversion(Untraceable(), input_shape=shape)


def test_input_shape_and_example_inputs_together() -> None:
    with pytest.raises(InvalidOptionError, match="not both"):
        convert_model(Untraceable(), skip_unnormalized=True, example_inputs=X, input_shape=[1, 4, 8, 8])


# --- a synthetic input when torch.fx cannot trace and no input is given (issue 13, point 3) -----------------


class Configured(Untraceable):
    """A model carrying a Hugging Face style ``config`` (num_channels, image_size) or a timm ``pretrained_cfg``."""

    def __init__(self, config: object = None, pretrained_cfg: object = None) -> None:
        super().__init__()
        if config is not None:
            self.config = config
        if pretrained_cfg is not None:
            self.pretrained_cfg = pretrained_cfg


class Untraceable1d(nn.Module):
    def __init__(self, dims: int = 1) -> None:
        super().__init__()
        conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        self.conv, self.bn, self.head = conv(2, 4, 3, padding=1), bn(4), conv(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return self.head(y.relu() if y.sum() > 0 else y)


def _config(**kwargs: object) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(**kwargs)


SYNTHETIC_CASES = [
    # id, model, expected shape, words the description must hold
    ("first-conv-default-size", Untraceable, (1, 4, 224, 224), ["first conv (conv.in_channels)", "default size"]),
    ("hf-config", lambda: Configured(_config(num_channels=4, image_size=16)), (1, 4, 16, 16), ["config.image_size"]),
    ("hf-config-pair", lambda: Configured(_config(num_channels=4, image_size=[12, 20])), (1, 4, 12, 20), []),
    ("hf-config-dict", lambda: Configured(_config(image_size={"height": 8, "width": 10})), (1, 4, 8, 10), []),
    ("timm-cfg", lambda: Configured(pretrained_cfg={"input_size": (4, 32, 32)}), (1, 4, 32, 32), ["pretrained_cfg"]),
    ("bad-config-values", lambda: Configured(_config(num_channels=0, image_size=True)), (1, 4, 224, 224), []),
    ("bad-timm-cfg", lambda: Configured(pretrained_cfg={"input_size": "224"}), (1, 4, 224, 224), ["default size"]),
    ("conv1d", Untraceable1d, (1, 2, 224), []),
    ("conv3d", lambda: Untraceable1d(3), (1, 2, 16, 112, 112), []),
]


@pytest.mark.parametrize(
    ("build", "shape", "words"), [c[1:] for c in SYNTHETIC_CASES], ids=[c[0] for c in SYNTHETIC_CASES]
)
def test_synthetic_input_is_built_from_the_model(build, shape: tuple, words: list[str]) -> None:
    from wsconvert.probes.unnormalized import synthetic_input

    model = build()
    rng = torch.get_rng_state()
    tensor, how = synthetic_input(model)
    assert torch.equal(torch.get_rng_state(), rng)  # its own generator: the user's RNG stream is untouched
    assert tensor.shape == shape and str(shape) in how
    assert all(word in how for word in words), how
    again, _ = synthetic_input(model)
    torch.testing.assert_close(again, tensor, rtol=0, atol=0)  # fixed seed


def test_synthetic_input_follows_device_and_dtype_and_needs_a_conv() -> None:
    from wsconvert.probes.unnormalized import synthetic_input

    assert synthetic_input(Untraceable().double())[0].dtype == torch.float64
    with torch.device("meta"):
        meta = Untraceable()
    assert synthetic_input(meta)[0].is_meta
    tensor, why = synthetic_input(nn.Sequential(nn.Linear(3, 3)))
    assert tensor is None and "no torch convolution" in why


def test_plan_conversion_probes_an_untraceable_model_on_a_synthetic_input() -> None:
    counts = {"calls": 0}
    model = Untraceable()
    model.conv.register_forward_pre_hook(lambda module, args: counts.__setitem__("calls", counts["calls"] + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it ran: nothing to warn about
        report = plan_conversion(model, gn=4)
    assert counts["calls"] == 1  # one forward pass
    assert report.unnormalized_detection.startswith("forward hooks on a synthetic input of shape (1, 4, 224, 224)")
    assert "torch.fx cannot trace" in report.unnormalized_detection
    assert [(u.path, u.feeds) for u in report.unnormalized] == [("head", "model output")]
    assert [h.kind for h in report.hints] == ["unnormalized", "probe_synthetic"]
    hint = report.hints[1]
    assert not hint.warning and "example_inputs=" in hint.message and "--input-shape" in hint.message
    assert "synthetic input" in str(report) and hint.message in str(report)
    converted = convert_model(model, gn=4, skip_unnormalized=True)  # convert_model probes the same way
    assert not parametrize.is_parametrized(converted.head) and parametrize.is_parametrized(converted.conv)
    # the public probe builds one only when asked; method="hooks" may then run without example_inputs
    assert probe_unnormalized(Untraceable()).method == "unavailable"
    for method in ("auto", "hooks"):
        result = probe_unnormalized(Untraceable(), method=method, synthetic=True)
        assert result.method == "hooks" and result.unnormalized == {"head": "model output"}
        assert result.synthetic.startswith("of shape (1, 4, 224, 224)")
    assert probe_unnormalized(Untraceable(), X, synthetic=True).synthetic == ""  # the user's input wins


def test_no_conv_reached_on_a_synthetic_input_is_said() -> None:
    class AllNormed(Untraceable):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y.relu().mean() if y.sum() > 0 else y.mean()

    report = plan_conversion(AllNormed(), gn=4)
    assert report.unnormalized == [] and [h.kind for h in report.hints] == ["probe_synthetic"]
    assert "No conv feeds anything but a normalization layer (found by forward hooks on a synthetic input" in str(
        report
    )


@pytest.mark.parametrize("call", ["plan_conversion", "convert_model"])
def test_failing_synthetic_forward_is_loud_and_says_how_to_fix(call: str) -> None:
    with pytest.warns(UserWarning) as caught:
        result = getattr(__import__("wsconvert"), call)(TwoInputs(), gn=4, skip_unnormalized=True)
    (warning,) = [w for w in caught if "could not be looked for" in str(w.message)]
    message = str(warning.message)
    assert "synthetic input of shape (1, 4, 224, 224)" in message and "TypeError" in message
    assert "example_inputs" in message and "--input-shape" in message and "skipped nothing" in message
    assert warning.filename == __file__  # points at the user's call, not inside wsconvert
    if call == "convert_model":
        assert parametrize.is_parametrized(result.head)  # nothing skipped


def test_plan_conversion_warns_when_the_probe_cannot_run_even_without_skip() -> None:
    from wsconvert.errors import ProbeUnavailableWarning

    with pytest.warns(ProbeUnavailableWarning, match="could not be looked for: torch.fx cannot trace.*input_shape"):
        report = plan_conversion(TwoInputs(), gn=4)
    assert [h.kind for h in report.hints if h.warning] == ["probe_unavailable"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_model(TwoInputs(), gn=4)  # no probe runs without skip_unnormalized: nothing to warn about


class Stateful(Untraceable):
    """A forward that changes state even in eval mode: a buffer in place, a replaced buffer, an attribute (kept:
    transformers records its installed output-capturing hooks in one)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("cache", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.cache = torch.ones(2)
        self.last_shape = tuple(x.shape)
        return super().forward(x)


def test_forward_passes_of_the_probe_leave_the_model_as_found() -> None:
    model = Stateful().train()
    model.bn.momentum = 1.0  # a BatchNorm that ran in training mode would take the input's statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = model.cache
    for kwargs in ({}, {"example_inputs": X}):
        plan_conversion(model, gn=4, **kwargs)
        after = model.state_dict()
        for key, value in before.items():
            torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
        assert model.cache is cache
        assert model.training and model.bn.training
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_group_sizes_are_not_chosen_on_a_synthetic_input() -> None:
    class PooledNorm(Untraceable):
        def __init__(self) -> None:
            super().__init__()
            self.pooled_bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pooled_bn(F.adaptive_avg_pool2d(super().forward(x), 1))

    report = plan_conversion(PooledNorm(), gn=3)
    assert report.unnormalized_detection.startswith("forward hooks on a synthetic input")
    assert {c.path: c.new_type for c in report.converted}["pooled_bn"] == "GroupNorm(3, 3)"  # requested groups
    with_input = plan_conversion(PooledNorm(), gn=3, example_inputs=X)
    assert {c.path: c.new_type for c in with_input.converted}["pooled_bn"] == "GroupNorm(1, 3)"
