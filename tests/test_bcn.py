"""Batch-Channel Normalization (norm="bcn", issue 12): wsconvert.norms.bcn against a reference written here.

The reference follows the description of BCN / EstBN in arXiv:1903.10520 and the authors' code
(joe-siyuan-qiao/Batch-Channel-Normalization: ``BCNorm``, ``EstBN``), written independently of the module:
explicit means and variances, the group part through the authors' (1, N*G, -1) view.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import wsconvert
from wsconvert.errors import InvalidOptionError, WSConvertError
from wsconvert.norms import bcn

pytestmark = pytest.mark.usefixtures("one_thread")

BN_EPS = 1e-5
GN_EPS = 1e-5


# --- the reference ------------------------------------------------------------------------------


class Reference:
    """BCN state and forward from the description: BN part (plain or estimated), GN(G) no affine, group affine."""

    def __init__(self, channels: int, groups: int, estimate: float | None, generator: torch.Generator) -> None:
        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, dtype=torch.float64)

        self.groups, self.estimate, self.momentum = groups, estimate, 0.1
        self.bn_weight = (0.5 + rand(channels)).requires_grad_()
        self.bn_bias = (rand(channels) - 0.5).requires_grad_()
        self.running_mean = rand(channels) - 0.5
        self.running_var = 0.5 + rand(channels)
        self.weight = (0.5 + rand(1, groups, 1)).requires_grad_()
        self.bias = (rand(1, groups, 1) - 0.5).requires_grad_()

    def load_into(self, module: bcn.BatchChannelNorm) -> None:
        with torch.no_grad():
            module.bn.weight.copy_(self.bn_weight)
            module.bn.bias.copy_(self.bn_bias)
            module.bn.running_mean.copy_(self.running_mean)
            module.bn.running_var.copy_(self.running_var)
            module.weight.copy_(self.weight)
            module.bias.copy_(self.bias)

    def forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        channels = x.shape[1]
        per_channel = x.transpose(0, 1).reshape(channels, -1)  # (C, N*spatial)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        if self.estimate is None:
            if training:
                mean = per_channel.mean(1)
                var = ((per_channel - mean[:, None]) ** 2).mean(1)
                count = per_channel.shape[1]
                with torch.no_grad():
                    self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * mean
                    unbiased = var * count / (count - 1)
                    self.running_var = (1 - self.momentum) * self.running_var + self.momentum * unbiased
            else:
                mean, var = self.running_mean, self.running_var
        else:
            r = self.estimate
            if training:
                with torch.no_grad():
                    batch_mean = per_channel.mean(1)
                    about_old = ((per_channel - self.running_mean[:, None]) ** 2).mean(1)  # OLD estimate
                    self.running_mean = (1 - r) * self.running_mean + r * batch_mean
                    self.running_var = (1 - r) * self.running_var + r * about_old
            mean, var = self.running_mean, self.running_var
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + BN_EPS)
        y = y * self.bn_weight.view(shape) + self.bn_bias.view(shape)
        n = x.shape[0]
        flat = y.reshape(1, n * self.groups, -1)  # the authors' view: per-sample group statistics
        g_mean = flat.mean(-1, keepdim=True)
        g_var = ((flat - g_mean) ** 2).mean(-1, keepdim=True)
        z = ((flat - g_mean) / torch.sqrt(g_var + GN_EPS)).reshape(n, self.groups, -1)
        return (self.weight * z + self.bias).reshape(x.shape)


SHAPES = {"3-d": (4, 8, 7), "4-d": (3, 8, 5, 6), "5-d": (2, 8, 3, 4, 5), "2-d": (6, 8)}
DIMS = {"3-d": 1, "4-d": 2, "5-d": 3, "2-d": 1}
MODES = {"plain": None, "estimated": 0.25}


def _module_and_reference(dims: int, estimate: float | None, groups: int = 4) -> tuple[nn.Module, Reference]:
    reference = Reference(8, groups, estimate, torch.Generator().manual_seed(3))
    module = bcn.BatchChannelNorm(8, groups, GN_EPS, estimate=estimate, dim=dims, dtype=torch.float64)
    reference.load_into(module)
    return module, reference


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_train_steps_then_eval_match_the_reference(shape: str, mode: str) -> None:
    """Two optimizer steps in train mode (outputs, gradients, running statistics, parameters), then eval."""
    module, reference = _module_and_reference(DIMS[shape], MODES[mode])
    ref_params = [reference.bn_weight, reference.bn_bias, reference.weight, reference.bias]
    ours = [module.bn.weight, module.bn.bias, module.weight, module.bias]
    opt_ref, opt = torch.optim.SGD(ref_params, lr=0.5), torch.optim.SGD(ours, lr=0.5)
    generator = torch.Generator().manual_seed(5)
    module.train()
    for step in range(2):
        x = 2 + 3 * torch.randn(SHAPES[shape], generator=generator, dtype=torch.float64)
        target = torch.randn(SHAPES[shape], generator=generator, dtype=torch.float64)
        expected, got = reference.forward(x, training=True), module(x)
        torch.testing.assert_close(got, expected)
        for out, optimizer in ((expected, opt_ref), (got, opt)):
            optimizer.zero_grad()
            ((out - target) ** 2).mean().backward()
            optimizer.step()
        for mine, theirs in zip(ours, ref_params, strict=True):
            torch.testing.assert_close(mine, theirs)
        torch.testing.assert_close(module.bn.running_mean, reference.running_mean)
        torch.testing.assert_close(module.bn.running_var, reference.running_var)
        assert int(module.bn.num_batches_tracked) == step + 1
    module.eval()
    x = torch.randn(SHAPES[shape], generator=generator, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference.forward(x, training=False))
    stats = module.bn.running_mean.clone()
    module(x)
    assert torch.equal(module.bn.running_mean, stats)  # eval never updates the estimates


def test_estimated_statistics_move_at_rate_r_with_the_variance_about_the_old_mean() -> None:
    """One step by hand: the numbers of the description (0.1 mean moves, var about the old mean 0)."""
    module = bcn.BatchChannelNorm(2, 1, estimate=0.1, dim=1)
    x = torch.tensor([[1.0, 3.0], [3.0, 3.0]])  # channel means 2, 3; old mean 0, old var 1
    module.train()(x)
    torch.testing.assert_close(module.bn.running_mean, torch.tensor([0.2, 0.3]))
    # mean((x - 0)^2) = (1 + 9) / 2 = 5 and 9: var = 0.9 * 1 + 0.1 * [5, 9]
    torch.testing.assert_close(module.bn.running_var, torch.tensor([1.4, 1.8]))


def test_estimated_part_normalizes_with_the_estimates_not_the_batch_and_no_gradient_reaches_them() -> None:
    module = bcn.BatchChannelNorm(4, 2, estimate=1.0, dim=2).train()
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = module(x)  # r = 1: the estimates are this batch's mean and second moment about the old mean (0)
    expected_var = (x.detach() ** 2).mean((0, 2, 3))
    torch.testing.assert_close(module.bn.running_var, expected_var)
    out.sum().backward()
    assert module.bn.running_mean.grad is None and not module.bn.running_mean.requires_grad
    module(x).sum().backward()  # a second forward before backward: saved tensors were not updated in place


# --- state dict and checkpoints ------------------------------------------------------------------


def _small_net(norm: type[nn.Module] = nn.BatchNorm2d, channels: int = 8) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, channels, 3, padding=1, bias=False),
            norm=norm(channels),
            relu=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(channels, 4),
        )
    )


def _randomize_norms(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and any(k in name for k in ("norm", "bn")):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
    return model


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_layout_is_the_reference_codes(mode: str) -> None:
    model = wsconvert.convert_model(_small_net(), gn=4, norm="bcn", bcn_estimate=MODES[mode])
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("norm.")}
    expected = {
        "norm.weight": (1, 4, 1),
        "norm.bias": (1, 4, 1),
        "norm.bn.weight": (8,),
        "norm.bn.bias": (8,),
        "norm.bn.running_mean": (8,),
        "norm.bn.running_var": (8,),
        "norm.bn.num_batches_tracked": (),
    }
    if mode == "estimated":
        expected["norm.bn.estbn_moving_speed"] = (1,)
        torch.testing.assert_close(model.norm.bn.estbn_moving_speed, torch.tensor([0.25]))
    assert layout == expected
    torch.testing.assert_close(model.norm.weight, torch.ones(1, 4, 1))
    torch.testing.assert_close(model.norm.bias, torch.zeros(1, 4, 1))


@pytest.mark.parametrize("mode", MODES)
def test_original_batchnorm_checkpoint_loads_strictly_into_bn(mode: str) -> None:
    original = _randomize_norms(torchvision.models.resnet18(num_classes=10))
    converted = wsconvert.convert_model(
        torchvision.models.resnet18(num_classes=10), gn=32, norm="bcn", bcn_estimate=MODES[mode]
    )
    assert sum(isinstance(m, wsconvert.BatchChannelNorm) for m in converted.modules()) == 20
    converted.load_state_dict(original.state_dict(), strict=True)
    for name in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(converted.layer2[0].bn1.bn, name), getattr(original.layer2[0].bn1, name))
    torch.testing.assert_close(converted.layer2[0].bn1.weight, torch.ones(1, 32, 1))  # group affine keeps its init
    if mode == "estimated":
        torch.testing.assert_close(converted.bn1.bn.estbn_moving_speed, torch.tensor([0.25]))


def test_converted_model_keeps_the_trained_batchnorm_function_in_its_bn_part() -> None:
    original = _randomize_norms(_small_net()).eval()
    converted = wsconvert.convert_model(original, gn=4, norm="bcn").eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        conv_out = F.conv2d(x, wsconvert.standardize_weight(original.conv.weight), padding=1)
        torch.testing.assert_close(converted.norm.bn(conv_out), original.norm(conv_out))


@pytest.mark.parametrize("mode", MODES)
def test_authors_pbn_checkpoint_loads(mode: str) -> None:
    source = wsconvert.convert_model(_small_net(), gn=4, norm="bcn", bcn_estimate=MODES[mode])
    _randomize_norms(source)
    authors = OrderedDict((k.replace("norm.bn.", "norm.pbn."), v) for k, v in source.state_dict().items())
    assert any(".pbn." in k for k in authors)
    target = wsconvert.convert_model(_small_net(), gn=4, norm="bcn", bcn_estimate=MODES[mode])
    target.load_state_dict(authors, strict=True)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


def test_authors_zero_rate_is_refused_on_load_and_the_configured_rate_kept() -> None:
    source = wsconvert.convert_model(_small_net(), gn=4, norm="bcn", bcn_estimate=0.5)
    state = source.state_dict()
    state["norm.bn.estbn_moving_speed"] = torch.zeros(1)  # the reference code's default
    target = wsconvert.convert_model(_small_net(), gn=4, norm="bcn", bcn_estimate=0.05)
    with pytest.warns(UserWarning, match="estbn_moving_speed=0.0 .* keeping the configured rate 0.05"):
        target.load_state_dict(state, strict=True)
    torch.testing.assert_close(target.norm.bn.estbn_moving_speed, torch.tensor([0.05]))


def test_incomplete_bcn_checkpoint_still_fails_strict_loading() -> None:
    model = wsconvert.convert_model(_small_net(), gn=4, norm="bcn")
    state = model.state_dict()
    del state["norm.bn.running_var"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*norm\.bn\.running_var"):
        model.load_state_dict(state, strict=True)


# --- options -------------------------------------------------------------------------------------

BAD_OPTIONS = {
    "unknown norm": ({"gn": 4, "norm": "bn"}, r"norm='bn' must be 'gn' .* or 'bcn'"),
    "norm without gn": ({"norm": "bcn"}, r"needs the number of groups: pass gn=G"),
    "gn norm without gn": ({"norm": "gn"}, r"pass gn=G"),
    "estimate without bcn": ({"gn": 4, "bcn_estimate": 0.1}, r"pass norm='bcn'"),
    "estimate zero": ({"gn": 4, "norm": "bcn", "bcn_estimate": 0}, r"bcn_estimate=0 must be a rate r with 0 < r <= 1"),
    "estimate negative": ({"gn": 4, "norm": "bcn", "bcn_estimate": -0.1}, r"bcn_estimate=-0.1 must be"),
    "estimate above one": ({"gn": 4, "norm": "bcn", "bcn_estimate": 1.5}, r"bcn_estimate=1.5 must be"),
    "estimate nan": ({"gn": 4, "norm": "bcn", "bcn_estimate": math.nan}, r"bcn_estimate=nan must be"),
    "estimate bool": ({"gn": 4, "norm": "bcn", "bcn_estimate": True}, r"bcn_estimate=True must be"),
    "estimate string": ({"gn": 4, "norm": "bcn", "bcn_estimate": "0.1"}, r"bcn_estimate='0.1' must be"),
}


@pytest.mark.parametrize("entry", BAD_OPTIONS)
@pytest.mark.parametrize("function", [wsconvert.convert_model, wsconvert.plan_conversion])
def test_bad_options_are_refused_before_anything_changes(function: object, entry: str) -> None:
    options, message = BAD_OPTIONS[entry]
    model = _small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WSConvertError, match=message):
        function(model, **options)
    assert isinstance(model.norm, nn.BatchNorm2d) and all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )


@pytest.mark.parametrize("rate", [1, 1.0, 1e-4])
def test_rates_in_range_are_accepted_and_reported(rate: float) -> None:
    report = wsconvert.plan_conversion(_small_net(), gn=4, norm="bcn", bcn_estimate=rate)
    assert report.to_dict()["options"]["norm"] == "bcn"
    assert report.to_dict()["options"]["bcn_estimate"] == rate
    assert report.converted[-1].new_type == "BatchChannelNorm(4, 8)"


def test_module_refuses_a_zero_rate_and_groups_that_do_not_divide() -> None:
    with pytest.raises(InvalidOptionError, match="estimate=0"):
        bcn.BatchChannelNorm(8, 4, estimate=0)
    with pytest.raises(InvalidOptionError, match="num_groups=3 must be >= 1 and divide num_channels=8"):
        bcn.BatchChannelNorm(8, 3)


# --- every replaced-norm rule --------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_timm_batchnormact_keeps_its_act_and_drop_around_the_bcn(mode: str) -> None:
    timm_norm_act = pytest.importorskip("timm.layers.norm_act")
    model = _small_net(lambda c: timm_norm_act.BatchNormAct2d(c, act_layer=nn.GELU, drop_layer=nn.Dropout))
    act, drop = model.norm.act, model.norm.drop
    converted = wsconvert.convert_model(model, gn=4, norm="bcn", bcn_estimate=MODES[mode], inplace=True)
    assert type(converted.norm) is bcn.BatchChannelNormAct
    assert converted.norm.act is act and converted.norm.drop is drop
    converted.load_state_dict(_randomize_norms(_small_net(nn.BatchNorm2d)).state_dict(), strict=False)
    x = torch.randn(2, 8, 4, 4)
    norm = converted.norm.eval()
    with torch.no_grad():
        expected = F.gelu(bcn.BatchChannelNorm.forward(norm, x))
        torch.testing.assert_close(norm(x), expected)


def test_timm_resnet_converts_and_loads_its_original_checkpoint() -> None:
    timm = pytest.importorskip("timm")
    original = timm.create_model("resnet18", num_classes=5)
    converted = wsconvert.convert_model(original, gn=16, norm="bcn")
    assert not any(type(m) is nn.BatchNorm2d and not bcn.is_batch_channel_part(m) for m in converted.modules())
    converted.load_state_dict(original.state_dict(), strict=True)
    converted.eval()(torch.randn(1, 3, 32, 32))


def test_frozen_batchnorm_stays_frozen_inside_the_bcn() -> None:
    frozen_type = torchvision.ops.misc.FrozenBatchNorm2d
    original = _randomize_norms(_small_net(frozen_type))
    report = wsconvert.plan_conversion(original, gn=4, norm="bcn", bcn_estimate=0.1)
    assert any("FrozenBatchNorm2d is frozen" in note and "bcn_estimate does not apply" in note for note in report.notes)
    converted = wsconvert.convert_model(original, gn=4, norm="bcn", bcn_estimate=0.1)
    assert type(converted.norm.bn) is frozen_type
    assert not converted.norm.weight.requires_grad and not converted.norm.bias.requires_grad
    converted.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        conv_out = converted.conv(x)
        torch.testing.assert_close(converted.norm.bn(conv_out), original.norm(conv_out))
    before = converted.norm.bn.running_mean.clone()
    converted.train()(x)
    assert torch.equal(converted.norm.bn.running_mean, before)


def test_group_fallback_when_groups_do_not_divide_the_channels() -> None:
    model = _small_net(channels=12)
    report = wsconvert.plan_conversion(model, gn=8, norm="bcn")
    assert [(f.channels, f.requested, f.groups) for f in report.group_fallbacks] == [(12, 8, 6)]
    converted = wsconvert.convert_model(model, gn=8, norm="bcn")
    assert converted.norm.num_groups == 6 and converted.norm.weight.shape == (1, 6, 1)


class _Abs(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs()


@pytest.mark.parametrize("names", [("weight",), ("bias",), ("weight", "bias")])
def test_batchnorm_with_a_parametrized_affine_is_skipped_with_its_reason(names: tuple[str, ...]) -> None:
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    for name in names:
        parametrize.register_parametrization(model[1], name, _Abs())
    report = wsconvert.plan_conversion(model, gn=4, norm="bcn")
    assert [s.path for s in report.skipped] == ["1"]
    assert "parametrization" in report.skipped[0].reason and "norm='gn'" in report.skipped[0].reason
    converted = wsconvert.convert_model(model, gn=4, norm="bcn")
    assert parametrize.type_before_parametrizations(converted[1]) is nn.BatchNorm2d
    assert parametrize.is_parametrized(converted[1]) and isinstance(converted[3], wsconvert.BatchChannelNorm)


def test_hooks_training_flag_and_shared_modules_are_carried() -> None:
    shared = nn.BatchNorm2d(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), shared, nn.Conv2d(8, 8, 1), shared)
    calls = []
    handle = shared.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    shared.eval()
    converted = wsconvert.convert_model(model, gn=4, norm="bcn", inplace=True)
    assert converted[1] is converted[3] and isinstance(converted[1], wsconvert.BatchChannelNorm)
    assert not converted[1].training and converted[0].training
    converted(torch.randn(1, 3, 4, 4))
    assert calls == ["BatchChannelNorm", "BatchChannelNorm"]  # once per call, on the BCN, not on its bn part
    handle.remove()
    converted(torch.randn(1, 3, 4, 4))
    assert len(calls) == 2


def test_bn1d_bn3d_and_syncbatchnorm_keep_their_kind() -> None:
    model = nn.ModuleDict({"a": nn.BatchNorm1d(8), "b": nn.BatchNorm3d(8), "c": nn.SyncBatchNorm(8)})
    converted = wsconvert.convert_model(model, gn=4, norm="bcn")
    assert [type(converted[k].bn) for k in "abc"] == [nn.BatchNorm1d, nn.BatchNorm3d, nn.SyncBatchNorm]
    estimated = wsconvert.convert_model(model, gn=4, norm="bcn", bcn_estimate=0.1)
    assert [estimated[k].bn.sync for k in "abc"] == [False, False, True]
    assert [estimated[k].dim for k in "abc"] == [1, 3, 2]


def test_converting_a_converted_model_again_leaves_the_bcn_alone() -> None:
    once = wsconvert.convert_model(_small_net(), gn=4, norm="bcn")
    report = wsconvert.plan_conversion(once, gn=4, norm="bcn")
    assert [s.reason for s in report.skipped if s.path == "norm.bn"] == [
        "the BatchNorm part of a BatchChannelNorm (already converted)"
    ]
    twice = wsconvert.convert_model(once, gn=4)
    assert type(twice.norm.bn) is nn.BatchNorm2d


def test_report_says_the_running_statistics_are_kept() -> None:
    notes = wsconvert.plan_conversion(_small_net(), gn=4, norm="bcn").notes
    assert not any("are dropped" in n for n in notes)
    assert any("BatchChannelNorm" in n and "kept" in n for n in notes)


# --- function preservation (data-free group affine) ----------------------------------------------


def test_data_free_group_affine_keeps_the_batchnorm_output_on_data_with_the_running_statistics() -> None:
    module, _ = _module_and_reference(2, None)
    module.eval()
    generator = torch.Generator().manual_seed(2)
    mean, std = module.bn.running_mean, module.bn.running_var.sqrt()
    x = mean.view(1, -1, 1, 1) + std.view(1, -1, 1, 1) * torch.randn(
        4, 8, 64, 64, generator=generator, dtype=torch.float64
    )
    with torch.no_grad():
        expected = module.bn(x)
        before = (module(x) - expected).abs().mean()
        bcn.data_free_group_affine(module)
        after = (module(x) - expected).abs().mean()
    assert after < 0.02 * expected.abs().mean() < before


# --- bake, export, compile, autocast, channels_last ----------------------------------------------


def _trained(mode: str, act: bool = False) -> nn.Module:
    model = _small_net()
    converted = wsconvert.convert_model(model, gn=4, norm="bcn", bcn_estimate=MODES[mode])
    _randomize_norms(converted)
    with torch.no_grad():
        converted.norm.weight.uniform_(0.5, 1.5)
        converted.norm.bias.uniform_(-0.5, 0.5)
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    for _ in range(2):
        converted(torch.randn(4, 3, 6, 6)).sum().backward()
        optimizer.step()
    return converted.eval()


@pytest.mark.parametrize("mode", MODES)
def test_bake_gives_plain_modules_equal_in_eval_and_torch_export_works(mode: str) -> None:
    model = _trained(mode)
    x = torch.randn(3, 3, 6, 6)
    baked = wsconvert.bake(model)
    assert not any(isinstance(m, (wsconvert.BatchChannelNorm, bcn.EstimatedBatchNorm)) for m in baked.modules())
    assert [type(m) for m in baked.norm] == [nn.BatchNorm2d, nn.GroupNorm]
    assert isinstance(model.norm, wsconvert.BatchChannelNorm)  # bake copies by default
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(baked(x), expected)
        exported = torch.export.export(baked, (x,)).module()
        torch.testing.assert_close(exported(x), expected)


def test_baked_model_exports_to_onnx() -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _trained("estimated")
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wsconvert.bake(model), (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-4, rtol=1e-4)


# aot_eager checks dynamo's capture and the autograd graph of both modes; inductor (C++ code generation, up to ~1.5 min
# on 2 cores) runs once, on the estimated mode, whose in-place statistics update is the part most at risk.
@pytest.mark.parametrize(("mode", "backend"), [*((m, "aot_eager") for m in MODES), ("estimated", "inductor")])
def test_compiled_training_matches_eager(mode: str, backend: str) -> None:
    eager = _trained(mode).train()
    compiled_model = _trained(mode).train()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend=backend)
    eager.zero_grad(set_to_none=True)
    compiled_model.zero_grad(set_to_none=True)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(compiled_model.norm.bn.running_var, eager.norm.bn.running_var)
    compiled(x).sum().backward()
    eager(x).sum().backward()
    torch.testing.assert_close(compiled_model.norm.weight.grad, eager.norm.weight.grad)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_trains_and_keeps_float32_statistics(mode: str) -> None:
    model = _trained(mode).train()
    reference = _trained(mode).train()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert model.norm.bn.running_var.dtype == torch.float32 and model.norm.weight.grad is not None
    torch.testing.assert_close(out.float(), reference(x), atol=0.1, rtol=0.05)
    torch.testing.assert_close(model.norm.bn.running_var, reference.norm.bn.running_var, atol=0.02, rtol=0.02)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", MODES)
def test_channels_last_input_gives_the_same_output(mode: str, training: bool) -> None:
    module, _ = _module_and_reference(2, MODES[mode])
    other, _ = _module_and_reference(2, MODES[mode])
    module.train(training)
    other.train(training)
    x = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    got = module(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, other(x))
    torch.testing.assert_close(module.bn.running_var, other.bn.running_var)


def test_preserve_sets_the_data_free_group_affine_on_every_converted_bcn() -> None:
    original = _randomize_norms(_small_net()).eval()
    converted = wsconvert.convert_model(original, gn=4, norm="bcn", preserve=True)
    expected = bcn.BatchChannelNorm(8, 4)
    expected.bn.load_state_dict(original.norm.state_dict())
    bcn.data_free_group_affine(expected)
    torch.testing.assert_close(converted.norm.weight, expected.weight)
    torch.testing.assert_close(converted.norm.bias, expected.bias)
    assert not torch.equal(converted.norm.weight, torch.ones(1, 4, 1))
    plain = wsconvert.convert_model(original, gn=4, norm="bcn")
    torch.testing.assert_close(plain.norm.weight, torch.ones(1, 4, 1))


# --- command line --------------------------------------------------------------------------------


def _cli(*args: object) -> object:
    from click.testing import CliRunner

    from wsconvert.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], prog_name="wsconvert")


@pytest.mark.parametrize("mode", MODES)
def test_cli_norm_bcn_output_loads_strictly_into_the_converted_architecture(tmp_path, mode: str) -> None:
    source = tmp_path / "resnet18.pt"
    torch.save(_randomize_norms(torchvision.models.resnet18(num_classes=10)).state_dict(), source)
    estimate = [] if MODES[mode] is None else ["--bcn-estimate", MODES[mode]]
    result = _cli(source, "--arch", "torchvision:resnet18", "--arch-kwargs", '{"num_classes": 10}', "--gn", 8,
                  "--norm", "bcn", *estimate)  # fmt: skip
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "resnet18.ws.pt", weights_only=True)
    model = wsconvert.convert_model(
        torchvision.models.resnet18(num_classes=10), gn=8, norm="bcn", bcn_estimate=MODES[mode]
    )
    model.load_state_dict(state, strict=True)
    assert state["layer1.0.bn1.weight"].shape == (1, 8, 1)
    assert ("layer1.0.bn1.bn.estbn_moving_speed" in state) is (mode == "estimated")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gn", 8, "--norm", "bcn", "--bcn-estimate", 0], "bcn_estimate=0.0 must be a rate r with 0 < r <= 1"),
        (["--norm", "bcn"], "pass gn=G as well"),
        (["--gn", 8, "--bcn-estimate", 0.1], "pass norm='bcn'"),
    ],
)
def test_cli_bad_bcn_options_are_one_error_line_and_no_output(tmp_path, args: list, message: str) -> None:
    source = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), source)
    result = _cli(source, "--arch", "torchvision:resnet18", "--arch-kwargs", '{"num_classes": 10}', *args)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet18.pt"]
