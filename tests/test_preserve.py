"""preserve=True (issue 11): Adaptive WS gain/shift, GroupNorm affines from BatchNorm, calibration, fidelity, CLI.

Exactness is checked against the unconverted model with assert_close; each such check is paired with the same
conversion without gain/shift (or with the naive affine), which must NOT match, so the test can fail.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from torch import nn
from torch.nn.utils import parametrize

import wsconvert
from wsconvert.cli import main
from wsconvert.errors import InvalidOptionError
from wsconvert.preserve import calibrate
from wsconvert.ws.adaptive import filter_gain_shift
from wsconvert.ws.recompute import recompute_in_backward

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def trained_like(model: nn.Module, *shape: int, seed: int = 0) -> nn.Module:
    """Random weights, but BatchNorm running statistics and affines that a trained model would have: the
    statistics of real activations (cumulative average over a few batches), gamma/beta away from 1/0."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None
                m.reset_running_stats()
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
        model.train()
        for _ in range(3):
            model(torch.randn(*shape))
    return model.eval()


@pytest.fixture
def few_distill_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """3 distillation steps instead of calibrate.DISTILL_STEPS, for tests of something else on a resnet18 (the
    distillation itself is tested on small models below)."""
    monkeypatch.setattr(calibrate, "DISTILL_STEPS", 3)


def ws_of(conv: nn.Module) -> wsconvert.WeightStandardization:
    return conv.parametrizations.weight[0]


# --- gain/shift: W_eff == W at conversion --------------------------------------------------------------

CONVS = {
    "conv1d": lambda: nn.Conv1d(4, 6, 3),
    "conv2d": lambda: nn.Conv2d(4, 6, 3, bias=False),
    "conv2d-groups": lambda: nn.Conv2d(4, 6, 3, groups=2),
    "conv3d": lambda: nn.Conv3d(4, 6, 2),
    "convtranspose1d": lambda: nn.ConvTranspose1d(4, 6, 3),
    "convtranspose2d-groups": lambda: nn.ConvTranspose2d(4, 6, 3, groups=2),
    "convtranspose3d": lambda: nn.ConvTranspose3d(4, 6, 2, bias=False),
}
INPUTS = {1: (2, 4, 9), 2: (2, 4, 7, 7), 3: (2, 4, 5, 5, 5)}


@pytest.mark.parametrize("style", ["standard", "paper"])
@pytest.mark.parametrize("kind", CONVS)
def test_gain_shift_make_the_standardized_weight_equal_the_weight(kind: str, style: str) -> None:
    conv = CONVS[kind]()
    with torch.no_grad():
        conv.weight.mul_(0.1).add_(0.02)  # filters with a mean and a small scale, as trained ones
    x = torch.randn(*INPUTS[conv.weight.dim() - 2])
    expected = conv(x)
    converted = wsconvert.convert_model(conv, preserve=True, style=style)
    ws = ws_of(converted)
    assert ws.gain.shape == ws.shift.shape == (conv.out_channels,)
    torch.testing.assert_close(converted.weight, conv.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(converted(x), expected, atol=1e-6, rtol=1e-5)
    naive = wsconvert.convert_model(conv, style=style)
    assert not torch.allclose(naive(x), expected, atol=1e-3)


@pytest.mark.parametrize("style", ["standard", "paper"])
def test_constant_filter_keeps_its_value(style: str) -> None:
    conv = nn.Conv2d(2, 3, 3, bias=False)
    with torch.no_grad():
        conv.weight[1] = 0.25  # zero variance: W_hat is 0, W_eff must be the constant again
    converted = wsconvert.convert_model(conv, preserve=True, style=style)
    torch.testing.assert_close(converted.weight, conv.weight, atol=1e-6, rtol=0)


def _timm_model() -> nn.Module:
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)


MODELS = {
    "torchvision-resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (4, 3, 32, 32)),
    "timm-mobilenetv3": (_timm_model, (4, 3, 32, 32)),
}


@pytest.mark.parametrize("name", MODELS)
def test_real_model_computes_the_same_outputs(name: str) -> None:
    build, shape = MODELS[name]
    model = trained_like(build(), *shape)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = model(x)
        converted = wsconvert.convert_model(model, preserve=True).eval()
        torch.testing.assert_close(converted(x), expected, atol=1e-4, rtol=1e-4)
        for module in converted.modules():  # the same model with gain/shift dropped computes something else
            if parametrize.is_parametrized(module, "weight"):
                ws_of(module).set_affine(None, None)
        assert not torch.allclose(converted(x), expected, atol=1e-2, rtol=1e-2)


def test_training_still_updates_w_through_the_standardization() -> None:
    conv = wsconvert.convert_model(nn.Conv2d(3, 4, 3), preserve=True)
    before = conv.parametrizations.weight.original.detach().clone()
    conv(torch.randn(2, 3, 8, 8)).square().sum().backward()
    assert conv.parametrizations.weight.original.grad is not None
    torch.optim.SGD(conv.parameters(), lr=0.1).step()
    assert not torch.equal(conv.parametrizations.weight.original, before)
    assert [n for n, _ in conv.named_parameters()] == ["bias", "parametrizations.weight.original"]


# --- state dicts ---------------------------------------------------------------------------------------


def resnet() -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=10)


@pytest.fixture(scope="module")
def plain() -> nn.Module:
    return trained_like(resnet(), 4, 3, 32, 32)


def test_plain_state_dict_loads_strictly_and_sets_gain_shift_from_its_weights(plain: nn.Module) -> None:
    model = wsconvert.convert_model(resnet(), preserve=True).eval()
    result = model.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    gain, shift = filter_gain_shift(plain.conv1.weight, ws_of(model.conv1))
    torch.testing.assert_close(ws_of(model.conv1).gain, gain)
    torch.testing.assert_close(ws_of(model.conv1).shift, shift)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=1e-4, rtol=1e-4)


def test_state_dict_with_gain_shift_keeps_them_and_round_trips(plain: nn.Module) -> None:
    source = wsconvert.convert_model(plain, gn=8, preserve=True).eval()
    state = source.state_dict()
    assert "conv1.parametrizations.weight.0.gain" in state and "layer4.1.conv2.parametrizations.weight.0.shift" in state
    state["conv1.parametrizations.weight.0.gain"] = state["conv1.parametrizations.weight.0.gain"] * 2
    fresh = wsconvert.convert_model(resnet(), gn=8, preserve=True).eval()
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(ws_of(fresh.conv1).gain, state["conv1.parametrizations.weight.0.gain"])
    source.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), source(x))


def test_bake_stores_w_eff(plain: nn.Module) -> None:
    model = wsconvert.convert_model(plain, preserve=True).eval()
    baked = wsconvert.bake(model).eval()
    assert not any(parametrize.is_parametrized(m) for m in baked.modules())
    assert not any("gain" in k or "shift" in k for k in baked.state_dict())
    torch.testing.assert_close(baked.conv1.weight, plain.conv1.weight, atol=1e-6, rtol=1e-5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(baked(x), plain(x), atol=1e-4, rtol=1e-4)
    copy.deepcopy(baked).load_state_dict(baked.state_dict(), strict=True)  # no gain/shift hook left behind


# --- eval cache and recompute --------------------------------------------------------------------------


def test_cache_serves_w_eff_and_sees_gain_shift_change() -> None:
    conv = wsconvert.convert_model(nn.Conv2d(3, 4, 3), preserve=True).eval()
    ws = ws_of(conv)
    with torch.no_grad():
        first = conv.weight
        assert conv.weight is first  # cached
        torch.testing.assert_close(first, conv.parametrizations.weight.original)
        # load_state_dict of gain alone (W untouched, so W's version does not change)
        conv.load_state_dict({"parametrizations.weight.0.gain": ws.gain * 3}, strict=False)
        after_load = conv.weight
        assert after_load is not first
        expected = wsconvert.standardize_weight(conv.parametrizations.weight.original) * ws.gain.view(-1, 1, 1, 1)
        torch.testing.assert_close(after_load, expected + ws.shift.view(-1, 1, 1, 1))
        ws.shift.add_(1.0)  # an in-place edit of a buffer
        torch.testing.assert_close(conv.weight, after_load + 1.0)


def test_recompute_in_backward_gives_the_same_gradients() -> None:
    model = trained_like(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)), 4, 3, 10, 10
    )
    a = wsconvert.convert_model(model, gn=2, preserve=True).train()
    b = copy.deepcopy(a)
    assert recompute_in_backward(b) == 2
    x = torch.randn(2, 3, 10, 10)
    a(x).square().mean().backward()
    b(x).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name, atol=1e-6, rtol=1e-5)


# --- GroupNorm affine from the BatchNorm ---------------------------------------------------------------


def test_data_free_affine_is_exact_when_sample_statistics_match_the_dataset() -> None:
    torch.manual_seed(0)
    channels, groups = 8, 2
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    # Every sample and channel has exactly mean m_c and (biased) variance v_c over its positions.
    pattern = torch.randn(3, 1, 6, 6)
    pattern = (pattern - pattern.mean((2, 3), keepdim=True)) / pattern.std((2, 3), correction=0, keepdim=True)
    x = bn.running_mean.view(1, -1, 1, 1) + bn.running_var.sqrt().view(1, -1, 1, 1) * pattern
    net = nn.Sequential(bn)
    gamma, gamma0, beta0 = bn.weight, bn.weight.detach().clone(), bn.bias.detach().clone()
    converted = wsconvert.convert_model(net, gn=groups, preserve=True, inplace=True).eval()
    gn = converted[0]
    assert isinstance(gn, nn.GroupNorm) and gn.weight is gamma  # still the Parameter an optimizer holds
    with torch.no_grad():
        expected = F.batch_norm(x, bn.running_mean, bn.running_var, None, None, False, 0.0, bn.eps)
        expected = expected * gamma0.view(1, -1, 1, 1) + beta0.view(1, -1, 1, 1)
        torch.testing.assert_close(gn(x), expected, atol=1e-5, rtol=1e-5)
        bn_again = copy.deepcopy(bn)
        bn_again.weight.copy_(gamma0)
        bn_again.bias.copy_(beta0)
        naive = wsconvert.convert_model(nn.Sequential(bn_again), gn=groups).eval()
        assert not torch.allclose(naive(x), expected, atol=1e-2)


def test_data_free_affine_matches_the_formula(plain: nn.Module) -> None:
    converted = wsconvert.convert_model(plain, gn=32, preserve=True)
    bn, gn = plain.layer2[0].bn1, converted.layer2[0].bn1
    m, v, g, b = bn.running_mean, bn.running_var, bn.weight.detach(), bn.bias.detach()
    s = (v + bn.eps).sqrt()
    mu = m.view(32, -1).mean(1).repeat_interleave(4)
    var = ((v + m * m).view(32, -1).mean(1) - m.view(32, -1).mean(1) ** 2).repeat_interleave(4)
    torch.testing.assert_close(gn.weight.detach(), g * (var + gn.eps).sqrt() / s)
    torch.testing.assert_close(gn.bias.detach(), b + g * (mu - m) / s)
    assert plain.layer2[0].bn1.weight is not gn.weight  # the copy's Parameter, not the original's


# --- calibration ---------------------------------------------------------------------------------------


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),  # in place: captured BatchNorm outputs must not be overwritten
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return trained_like(small_cnn(), 8, 3, 12, 12)


def test_least_squares_fit_of_the_first_layer(cnn: nn.Module) -> None:
    x = torch.randn(6, 3, 12, 12)
    converted = wsconvert.convert_model(cnn, gn=4, preserve=True)
    pairs = [(path, cnn.get_submodule(path), converted.get_submodule(path)) for path in ("1", "4")]
    assert calibrate.fit_affines(cnn, converted, pairs, [x]) == {"1", "4"}
    with torch.no_grad():
        z = F.group_norm(converted[0](x), 4, None, None, converted[1].eps)  # conv0 is exact: same input
        y = cnn[1](cnn[0](x))
    for c in range(8):
        design = torch.stack([z[:, c].flatten(), torch.ones(z[:, c].numel())], 1).double()
        solution = torch.linalg.lstsq(design, y[:, c].flatten().double().unsqueeze(1)).solution.flatten()
        torch.testing.assert_close(converted[1].weight[c].double(), solution[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(converted[1].bias[c].double(), solution[1], atol=1e-5, rtol=1e-4)


# --- end-to-end distillation of the GroupNorm affines -----------------------------------------------------

DEEP_PATHS = ("1", "4", "7")


def deep_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


def template_task(n: int, generator: torch.Generator, templates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """5 classes, each a fixed random image plus noise, with a per-sample contrast and brightness (what a
    BatchNorm keeps and a GroupNorm normalizes away)."""
    y = torch.randint(0, 5, (n,), generator=generator)
    x = templates[y] + 0.8 * torch.randn(n, 3, 12, 12, generator=generator)
    return x * (0.5 + torch.rand(n, 1, 1, 1, generator=generator)) + 0.5 * torch.randn(
        n, 1, 1, 1, generator=generator
    ), y


@pytest.fixture(scope="module")
def task_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A BatchNorm CNN really trained (60 Adam steps) on template_task: (model, 32 calibration inputs, 256
    held-out inputs)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    templates = torch.randn(5, 3, 12, 12, generator=generator)
    model = deep_cnn()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        x, y = template_task(32, generator, templates)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), template_task(32, generator, templates)[0], template_task(256, generator, templates)[0]


def held_out_kl(converted: nn.Module, original: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        got, want = F.log_softmax(converted.eval()(x), 1), F.log_softmax(original(x), 1)
    return float(F.kl_div(got, want, log_target=True, reduction="batchmean"))


def least_squares_only(model: nn.Module, x: torch.Tensor) -> nn.Module:
    converted = wsconvert.convert_model(model, gn=4, preserve=True)
    pairs = [(path, model.get_submodule(path), converted.get_submodule(path)) for path in DEEP_PATHS]
    calibrate.fit_affines(model, converted, pairs, [x])
    return converted


def test_distilled_affines_beat_data_free_and_least_squares_on_held_out_data(task_model) -> None:
    model, calib, held = task_model
    data_free = wsconvert.convert_model(model, gn=4, preserve=True)
    fitted = least_squares_only(model, calib)
    calibrated = wsconvert.convert_model(model, gn=4, preserve=True, calibration_data=calib)
    kl_free, kl_fitted, kl_calibrated = (held_out_kl(m, model, held) for m in (data_free, fitted, calibrated))
    assert kl_calibrated < 0.6 * min(kl_free, kl_fitted), (kl_free, kl_fitted, kl_calibrated)
    fidelity = wsconvert.preserve.fidelity.measure_fidelity
    assert fidelity(model, calibrated, held).top1_agreement > fidelity(model, data_free, held).top1_agreement
    assert [layer.method for layer in fidelity(model, calibrated, held, methods={p: "calibrated" for p in
            DEEP_PATHS}).layers] == ["calibrated"] * 3  # fmt: skip


def _affines(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.split(".")[0] in {p.split(".")[0] for p in DEEP_PATHS}}


def test_calibration_steps_sets_the_distillation(task_model) -> None:
    """calibration_steps=0 is the least-squares fit alone; a number of steps is that many distillation steps
    (the default, None, is calibrate.DISTILL_STEPS); the option is recorded in the report."""
    model, calib, _ = task_model
    fitted = least_squares_only(model, calib)
    none = wsconvert.convert_model(model, gn=4, preserve=True, calibration_data=calib, calibration_steps=0)
    torch.testing.assert_close(_affines(none), _affines(fitted), rtol=0, atol=0)
    default = wsconvert.convert_model(model, gn=4, preserve=True, calibration_data=calib)
    explicit = wsconvert.convert_model(
        model, gn=4, preserve=True, calibration_data=calib, calibration_steps=calibrate.DISTILL_STEPS
    )
    torch.testing.assert_close(_affines(explicit), _affines(default), rtol=0, atol=0)
    few = wsconvert.convert_model(model, gn=4, preserve=True, calibration_data=calib, calibration_steps=5)
    assert any(not torch.equal(a, b) for a, b in zip(_affines(few).values(), _affines(default).values(), strict=True))
    report = wsconvert.plan_conversion(model, gn=4, preserve=True, calibration_data=calib, calibration_steps=0)
    assert report.options["calibration_steps"] == 0


def test_distillation_changes_only_the_groupnorm_affines_and_restores_the_state(task_model) -> None:
    model, calib, _ = task_model
    model = copy.deepcopy(model).train()
    model[0].weight.requires_grad_(False)
    model[3].weight.grad = torch.ones_like(model[3].weight)
    model[11].bias.grad = torch.full_like(model[11].bias, 2.0)
    model[11].eval()  # a mixed state must come back as it was
    flags = {name: m.training for name, m in model.named_modules() if name not in DEEP_PATHS}
    gn_params = {id(p) for path in DEEP_PATHS for p in model.get_submodule(path).parameters()}
    objects = {name: p for name, p in model.named_parameters()}
    grads = {name: p.grad for name, p in model.named_parameters()}
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    start = least_squares_only(copy.deepcopy(model), calib)
    other_values = {name: p.detach().clone() for name, p in start.named_parameters() if id(p) not in gn_params}
    other_values.update({name: b.clone() for name, b in start.named_buffers()})

    converted = wsconvert.convert_model(model, gn=4, preserve=True, calibration_data=calib, inplace=True)
    assert converted is model
    assert {name: m.training for name, m in model.named_modules() if name in flags} == flags
    named = dict(model.named_parameters())
    for path in DEEP_PATHS:  # the GroupNorms hold the BatchNorms' Parameter objects, with new values
        gn = model.get_submodule(path)
        assert isinstance(gn, nn.GroupNorm) and gn.weight is objects[f"{path}.weight"]
        assert not torch.equal(gn.weight, start.get_submodule(path).weight)
    for name, p in named.items():
        key = name.replace(".parametrizations.weight.original", ".weight")
        assert p.requires_grad == frozen[key] and p.grad is grads[key], name
        if id(p) not in gn_params:
            assert torch.equal(p, other_values[name]), f"{name} changed"
    for name, b in model.named_buffers():
        assert torch.equal(b, other_values[name]), f"{name} changed"


def test_distillation_is_deterministic(task_model) -> None:
    model, calib, _ = task_model
    a, b = (wsconvert.convert_model(model, gn=4, preserve=True, calibration_data=calib) for _ in range(2))
    for path in DEEP_PATHS:
        assert torch.equal(a.get_submodule(path).weight, b.get_submodule(path).weight)
        assert torch.equal(a.get_submodule(path).bias, b.get_submodule(path).bias)


@pytest.mark.parametrize(
    ("case", "kwargs"),
    [("no steps", {"steps": 0}), ("a step size that diverges", {"lr": 1e3})],
)
def test_distillation_that_cannot_help_leaves_the_fit(task_model, case: str, kwargs: dict) -> None:
    model, calib, _ = task_model
    converted = least_squares_only(model, calib)
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    pairs = [(path, model.get_submodule(path), converted.get_submodule(path)) for path in DEEP_PATHS]
    assert calibrate.distill_affines(model, converted, pairs, [calib], **kwargs) == set(), case
    for key, value in converted.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_distillation_of_feature_map_outputs_lowers_the_error(task_model) -> None:
    model, calib, held = task_model
    trunk = copy.deepcopy(model[:9])  # (N, 16, 6, 6) outputs: the relative squared error replaces the KL
    fidelity = wsconvert.preserve.fidelity.measure_fidelity
    fitted = least_squares_only(trunk, calib)
    pairs = [(path, trunk.get_submodule(path), fitted.get_submodule(path)) for path in DEEP_PATHS]
    before = fidelity(trunk, fitted, held).relative_error
    assert calibrate.distill_affines(trunk, fitted, pairs, [calib]) == set(DEEP_PATHS)
    assert fidelity(trunk, fitted, held).relative_error < before


def _same_affines(a: nn.Module, b: nn.Module) -> None:
    for ga, gb in zip((m for m in a.modules() if isinstance(m, nn.GroupNorm)), (m for m in b.modules()
                      if isinstance(m, nn.GroupNorm)), strict=True):  # fmt: skip
        torch.testing.assert_close(ga.weight, gb.weight)
        torch.testing.assert_close(ga.bias, gb.bias)


def test_calibration_input_forms_give_the_same_fit(cnn: nn.Module) -> None:
    x = torch.randn(8, 3, 12, 12)
    y = torch.randint(0, 5, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    reference = wsconvert.convert_model(cnn, gn=4, preserve=True, calibration_data=[x[:4], x[4:]])
    for data in (loader, [(x[:4], y[:4]), [x[4:], y[4:]]], (x[:4], x[4:])):
        _same_affines(wsconvert.convert_model(cnn, gn=4, preserve=True, calibration_data=data), reference)
    one_batch = wsconvert.convert_model(cnn, gn=4, preserve=True, calibration_data=x)
    _same_affines(one_batch, reference)  # the fit sums over samples, the distillation rebatches them


def test_calibration_restores_training_flags_and_leaves_the_original_alone(cnn: nn.Module) -> None:
    model = copy.deepcopy(cnn).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = wsconvert.convert_model(model, gn=4, preserve=True, calibration_data=torch.randn(4, 3, 12, 12))
    assert model.training and converted.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)


BAD_DATA = {
    "an int": (3, r"must be a Tensor of inputs or an iterable of batches.*got int"),
    "a string": ("images.pt", r"got str"),
    "a dict": ({"x": torch.randn(2, 3, 12, 12)}, r"got dict"),
    "an empty list": ([], r"holds no batch"),
    "a list with a string": ([torch.randn(2, 3, 12, 12), "x"], r"batch 1 is a str"),
    "a tuple of labels first": ([(torch.tensor([1]).tolist(), torch.randn(2, 3, 12, 12))], r"first element is a list"),
    "a 0-d tensor": (torch.tensor(1.0), r"needs a batch dimension"),
    "an empty batch": (torch.randn(0, 3, 12, 12), r"at least one sample"),
    "wrong channels": (torch.randn(2, 4, 12, 12), r"cannot run calibration_data batch 0 of shape \(2, 4, 12, 12\)"),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_calibration_data_is_a_clear_error_and_changes_nothing(cnn: nn.Module, case: str, inplace: bool) -> None:
    data, message = BAD_DATA[case]
    model = copy.deepcopy(cnn)
    with pytest.raises(InvalidOptionError, match=message):
        wsconvert.convert_model(model, gn=4, preserve=True, calibration_data=data, inplace=inplace)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert isinstance(model[1], nn.BatchNorm2d)


def test_calibration_data_without_preserve_is_refused(cnn: nn.Module) -> None:
    for entry in (wsconvert.convert_model, wsconvert.plan_conversion):
        with pytest.raises(InvalidOptionError, match=r"only used with preserve=True"):
            entry(cnn, gn=4, calibration_data=torch.randn(2, 3, 12, 12))
    with pytest.raises(InvalidOptionError, match=r"preserve='yes' must be True or False"):
        wsconvert.convert_model(cnn, preserve="yes")


# --- fidelity report -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("few_distill_steps")
def test_fidelity_in_the_report(plain: nn.Module) -> None:
    x = torch.randn(6, 3, 32, 32)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    exact = wsconvert.plan_conversion(plain, preserve=True, calibration_data=x)
    fid = exact.fidelity
    assert fid.samples == 6 and fid.top1_agreement == 1.0
    assert fid.max_abs_error < 1e-4 and fid.relative_error < 1e-5 and fid.cosine == pytest.approx(1.0, abs=1e-6)
    assert len(fid.layers) == 20 and {layer.method for layer in fid.layers} == {"kept"}
    assert all(layer.relative_error < 1e-4 for layer in fid.layers)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, before[key]), f"plan_conversion changed {key}"

    report = wsconvert.plan_conversion(plain, gn=32, preserve=True, calibration_data=[x[:3], (x[3:],)])
    data = json.loads(json.dumps(report.to_dict()))
    assert data["options"]["preserve"] is True
    assert set(data["fidelity"]) == {"samples", "max_abs_error", "relative_error", "cosine", "top1_agreement", "layers"}
    assert data["fidelity"]["layers"][0] == {
        "path": "bn1", "type": "GroupNorm", "method": "calibrated", "relative_error": pytest.approx(
            report.fidelity.layers[0].relative_error)}  # fmt: skip
    assert 0 < report.fidelity.relative_error < 1
    text = str(report)
    assert "Fidelity on the calibration data (6 samples): top-1 agreement" in text
    assert "layer4.1.bn2" in text.split("Fidelity")[1] and "calibrated" in text
    assert "preserve: 20 standardized conv(s) get Adaptive WS gain/shift" in text

    plain_report = wsconvert.plan_conversion(plain, gn=32, preserve=True)
    assert plain_report.fidelity is None and plain_report.to_dict()["fidelity"] is None
    assert "Fidelity" not in str(plain_report)


def test_fidelity_of_non_classification_outputs() -> None:
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 4, 3, 8, 8)
    fid = wsconvert.plan_conversion(model, gn=2, preserve=True, calibration_data=torch.randn(3, 3, 8, 8)).fidelity
    assert fid.top1_agreement is None and "top-1 agreement n/a" in "\n".join(fid.lines())


# --- engines: compile, Opacus, export ------------------------------------------------------------------


def test_compile_matches_eager(cnn: nn.Module) -> None:
    model = wsconvert.convert_model(cnn, gn=4, preserve=True, calibration_data=torch.randn(4, 3, 12, 12)).eval()
    x = torch.randn(2, 3, 12, 12)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_opacus_accepts_a_calibrated_model_after_enable_opacus(cnn: nn.Module) -> None:
    """enable_opacus() exempts gain/shift from Opacus's buffer check (docs/preserve.md; the per-sample gradients
    are checked in tests/test_integration_opacus.py); the distillation leaves no state Opacus would refuse."""
    from opacus import GradSampleModule

    from wsconvert.integrations import enable_opacus

    enable_opacus()
    model = wsconvert.convert_model(cnn, gn=4, preserve=True, calibration_data=torch.randn(4, 3, 12, 12))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    GradSampleModule(model, loss_reduction="sum")


def test_export_and_onnx_after_bake(cnn: nn.Module) -> None:
    import onnxruntime as ort

    model = wsconvert.convert_model(cnn, gn=4, preserve=True).eval()
    baked = wsconvert.bake(model).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.export.export(baked, (x,)).module()(x), expected, atol=1e-5, rtol=1e-5)
    program = torch.onnx.export(baked, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-4, rtol=1e-4)


# --- CLI -----------------------------------------------------------------------------------------------

ARCH = ["--arch", "torchvision:resnet18", "--arch-kwargs", '{"num_classes": 10}']


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, plain: nn.Module) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    torch.save(plain.state_dict(), folder / "model.pt")
    return folder / "model.pt"


def _save_inputs(path: Path, x: torch.Tensor) -> None:
    if path.suffix == ".npy":
        np.save(path, x.numpy())
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"inputs": x}, str(path))
    else:
        torch.save(x, path)


def run(*args: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.usefixtures("few_distill_steps")
@pytest.mark.parametrize("suffix", [".pt", ".npy", ".safetensors"])
def test_cli_preserve_with_calibration_loads_strictly_and_matches_python(
    checkpoint: Path, plain: nn.Module, tmp_path: Path, suffix: str
) -> None:
    x = torch.randn(5, 3, 32, 32)
    inputs = tmp_path / f"inputs{suffix}"
    _save_inputs(inputs, x)
    out = tmp_path / "out.pt"
    result = run(checkpoint, *ARCH, "--gn", 8, "--preserve", "--calibration", inputs, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["report"]
    assert report["fidelity"]["samples"] == 5 and report["options"]["preserve"] is True
    state = torch.load(out, weights_only=True)
    info = state._metadata["__wsconvert__"]
    assert info["options"]["preserve"] is True and info["calibration"] == inputs.name
    options = {k: v for k, v in info["options"].items() if k != "input_shape"}
    loaded = wsconvert.convert_model(resnet(), **options).eval()
    loaded.load_state_dict(state, strict=True)
    python = wsconvert.convert_model(plain, gn=8, preserve=True, calibration_data=x).eval()
    probe = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe), python(probe))


def test_cli_calibration_steps_is_recorded_and_rebuilds_the_same_model(
    checkpoint: Path, plain: nn.Module, tmp_path: Path
) -> None:
    x = torch.randn(5, 3, 32, 32)
    inputs = tmp_path / "inputs.pt"
    _save_inputs(inputs, x)
    out = tmp_path / "out.pt"
    args = ("--gn", 8, "--preserve", "--calibration", inputs, "--calibration-steps", 0, "-o", out)
    assert run(checkpoint, *ARCH, *args).exit_code == 0
    state = torch.load(out, weights_only=True)
    assert state._metadata["__wsconvert__"]["options"]["calibration_steps"] == 0
    python = wsconvert.convert_model(plain, gn=8, preserve=True, calibration_data=x, calibration_steps=0)
    torch.testing.assert_close(dict(state), python.state_dict(), rtol=0, atol=0)


def test_cli_preserve_without_calibration_and_bake(checkpoint: Path, plain: nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "baked.pt"
    assert run(checkpoint, *ARCH, "--preserve", "--bake", "-o", out).exit_code == 0
    baked = resnet().eval()
    baked.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(baked(x), plain(x), atol=1e-4, rtol=1e-4)


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    (folder / "junk.pt").write_bytes(b"not a tensor file at all")
    torch.save({"x": torch.randn(2, 3, 32, 32)}, folder / "dict.pt")
    torch.save(torch.randn(2, 1, 32, 32), folder / "gray.pt")
    torch.save(torch.zeros(2, 3, 32, 32, dtype=torch.int64), folder / "ints.pt")
    torch.save(torch.randn(2, 3), folder / "flat.pt")
    from safetensors.torch import save_file

    save_file({"a": torch.randn(1, 3, 32, 32), "b": torch.randn(1)}, str(folder / "two.safetensors"))
    return {
        "missing": (folder / "nope.pt", r"calibration file .*nope.pt does not exist"),
        "junk": (folder / "junk.pt", r"cannot read calibration file"),
        "dict": (folder / "dict.pt", r"holds a dict, not a Tensor"),
        "gray": (folder / "gray.pt", r"1 channels, but the model's first conv takes 3"),
        "ints": (folder / "ints.pt", r"torch.int64 tensor .* must be floating point"),
        "two tensors": (folder / "two.safetensors", r"holds 2 tensors"),
        "flat": (folder / "flat.pt", r"cannot run calibration_data batch 0 of shape \(2, 3\)"),
    }


def test_cli_bad_calibration_files(checkpoint: Path, tmp_path: Path) -> None:
    for case, (path, message) in _bad_files(tmp_path).items():
        out = tmp_path / "out.pt"
        result = CliRunner().invoke(main, [str(checkpoint), *ARCH, "--gn", "8", "--preserve", "--calibration",
                                           str(path), "-o", str(out)])  # fmt: skip
        assert result.exit_code == 1, (case, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (case, lines)
        assert re.search(message, lines[0]), (case, lines[0])
        assert not out.exists(), case
    result = CliRunner().invoke(main, [str(checkpoint), *ARCH, "--calibration", str(path), "-o", str(out)])
    assert result.exit_code == 1 and "add --preserve" in result.output and not out.exists()


@pytest.mark.parametrize(
    ("norm", "expected"),
    [
        ("gn", "the affine of the 20 GroupNorm(s) is set from the replaced BatchNorm"),
        ("bcn", "the per-group affine of the 20 BatchChannelNorm(s) is set data-free from the kept BatchNorm"),
    ],
)
def test_preserve_note_names_the_replacement(plain: nn.Module, norm: str, expected: str) -> None:
    report = wsconvert.plan_conversion(plain, gn=32, norm=norm, preserve=True)
    notes = [n for n in report.notes if n.startswith("preserve: the ")]
    assert len(notes) == 1 and expected in notes[0]
