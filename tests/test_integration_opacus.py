"""Opacus: converted models validate, give exact per-sample gradients, and train with DP-SGD (issue 4, point 6).

Per-sample gradients of a standardized conv without a bias need ``wsconvert.integrations.enable_opacus()``
(the reason is in that module's docstring); these tests call it and check the result against per-example
backward passes, and check that without it Opacus indeed fails the way the docstring says.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torchvision
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn

import wsconvert
from wsconvert.errors import WSConvertError
from wsconvert.integrations import enable_opacus, has_standardization

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def tiny_cnn(bias: bool) -> nn.Module:
    """Convs with and without bias, a grouped conv, BatchNorm (to become GroupNorm) and a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2, bias=bias),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def no_inplace(model: nn.Module) -> nn.Module:
    """Opacus's full backward hooks forbid in-place ops on a hooked layer's output (an Opacus limit)."""
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return model


@pytest.mark.parametrize(
    "arch",
    [
        lambda: torchvision.models.resnet18(weights=None, num_classes=10),
        lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10),
    ],
    ids=["resnet18", "mobilenet_v2"],
)
def test_module_validator_reports_nothing(arch) -> None:
    net = arch()
    assert ModuleValidator.validate(net, strict=False), "the unconverted model has BatchNorm: Opacus must object"
    assert ModuleValidator.validate(wsconvert.convert_model(net, gn=32), strict=False) == []


def _per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample gradients the slow, obvious way: one backward pass per example."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        rows.append([p.grad.clone() for p in model.parameters()])
    return [torch.stack(column) for column in zip(*rows, strict=True)]


@pytest.mark.parametrize("force_functorch", [False, True], ids=["hooks-mode", "functorch-mode"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_per_sample_gradients_are_exact(bias: bool, force_functorch: bool) -> None:
    enable_opacus()
    model = wsconvert.convert_model(tiny_cnn(bias), gn=4)
    expected = _per_example_grads(copy.deepcopy(model), x := torch.randn(3, 3, 8, 8), y := torch.tensor([1, 2, 3]))
    gsm = GradSampleModule(model, loss_reduction="sum", force_functorch=force_functorch)
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    names = [name for name, _ in model.named_parameters()]
    assert "0.parametrizations.weight.original" in names
    for name, param, want in zip(names, model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad_sample, want, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(param.grad_sample.sum(0), param.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_real_model_per_sample_gradients_sum_to_batch_gradient() -> None:
    enable_opacus()
    model = wsconvert.convert_model(no_inplace(torchvision.models.mobilenet_v2(weights=None, num_classes=10)), gn=32)
    gsm = GradSampleModule(model, loss_reduction="sum")
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    standardized = [m for m in model.modules() if has_standardization(m)]
    assert len(standardized) == 52
    checked = 0
    for name, param in model.named_parameters():
        assert param.grad_sample is not None, name
        torch.testing.assert_close(param.grad_sample.sum(0), param.grad, atol=1e-5, rtol=1e-4, msg=name)
        checked += name.endswith("parametrizations.weight.original")
    assert checked == 52


def _dp_sgd_epoch(model: nn.Module) -> tuple[PrivacyEngine, int]:
    """One epoch of DP-SGD through ``PrivacyEngine.make_private`` on 12 random 8x8 images, batches of 4:
    (the engine, the number of steps taken)."""
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 8, 8), torch.randint(0, 4, (12,)))
    engine = PrivacyEngine()
    private, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(data, batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    steps = 0
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(private(x), y).backward()
        optimizer.step()
        steps += 1
    return engine, steps


def test_dp_sgd_with_make_private_trains() -> None:
    enable_opacus()
    torch.manual_seed(0)
    model = wsconvert.convert_model(tiny_cnn(bias=False), gn=4)
    before = copy.deepcopy(model.state_dict())
    engine, steps = _dp_sgd_epoch(model)
    assert steps == 3
    assert 0 < engine.get_epsilon(delta=1e-5) < float("inf")
    after = model.state_dict()
    for key in ("0.parametrizations.weight.original", "3.parametrizations.weight.original", "1.weight"):
        assert torch.isfinite(after[key]).all()
        assert not torch.equal(after[key], before[key]), f"{key} did not move"


def test_enable_opacus_is_idempotent_and_leaves_other_modules_alone() -> None:
    from opacus.grad_sample import grad_sample_module as gsm

    enable_opacus()
    walk = gsm.GradSampleHooks.iterate_submodules
    patched = {n: getattr(gsm, n) for n in ("requires_grad", "prepare_layer", "ft_compute_per_sample_gradient")}
    validate = gsm.GradSampleHooks.__dict__["validate"].__func__
    enable_opacus()
    assert gsm.GradSampleHooks.iterate_submodules is walk
    assert gsm.GradSampleHooks.__dict__["validate"].__func__ is validate
    assert all(getattr(gsm, name) is value for name, value in patched.items())
    assert all(getattr(value, "__wrapped__", None) is not None for value in patched.values())
    plain = ModuleValidator.fix(tiny_cnn(bias=False))
    hooked = [type(m).__name__ for m in GradSampleModule(plain).iterate_submodules(plain)]
    assert hooked == ["Conv2d", "GroupNorm", "Conv2d", "GroupNorm", "Linear"]


def test_without_enable_opacus_bias_free_convs_fail_as_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Opacus behaviour enable_opacus() exists for: it hooks the ParametrizationList, then IndexError."""
    from opacus.grad_sample import grad_sample_module as gsm

    enable_opacus()
    monkeypatch.setattr(gsm.GradSampleHooks, "iterate_submodules", gsm.GradSampleHooks.iterate_submodules.__wrapped__)
    monkeypatch.setattr(gsm, "requires_grad", gsm.requires_grad.__wrapped__)
    model = GradSampleModule(wsconvert.convert_model(tiny_cnn(bias=False), gn=4), loss_reduction="sum")
    hooked = [type(m).__name__ for m in model.iterate_submodules(model._module)]
    assert hooked == ["ParametrizationList", "GroupNorm", "ParametrizationList", "GroupNorm", "Linear"]
    with pytest.raises(IndexError):
        model(torch.randn(2, 3, 8, 8)).sum().backward()


def test_enable_opacus_without_opacus_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opacus.grad_sample", None)  # makes the import fail
    with pytest.raises(WSConvertError, match=r"pip install opacus"):
        enable_opacus()


def test_enable_opacus_on_an_opacus_without_the_extension_points_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from opacus.grad_sample import grad_sample_module as gsm

    monkeypatch.delattr(gsm, "requires_grad")
    with pytest.raises(WSConvertError, match=r"Opacus 1\.5-1\.6"):
        enable_opacus()


# --- preserve=True: the Adaptive WS gain/shift buffers (issue 11) ----------------------------------------------


def _trained_like(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Filters with a mean and a small scale, as trained ones (so gain/shift are far from 1/0), and BatchNorm
    statistics of real activations; returned in train mode, as DP-SGD uses it."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                m.weight.mul_(0.3).add_(torch.randn(m.weight.shape[0] if not m.transposed else 1).mean() * 0.1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        model.train()(x)
    return model


PRESERVED = {
    # name: (unconverted model, input shape, gn)
    "conv2d-gn=None": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, groups=2),
            nn.Flatten(),
            nn.Linear(8 * 36, 4),
        ),
        (3, 3, 8, 8),
        None,
    ),
    "conv2d-gn=8": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, bias=True),
            nn.BatchNorm2d(16),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 4),
        ),
        (3, 3, 8, 8),
        8,
    ),
    "conv1d-gn=8": (
        lambda: nn.Sequential(
            nn.Conv1d(3, 8, 3, bias=False),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Conv1d(8, 8, 3, groups=2),
            nn.Flatten(),
            nn.Linear(8 * 5, 4),
        ),
        (3, 3, 9),
        8,
    ),
    "convtranspose2d-gn=None": (
        lambda: nn.Sequential(
            nn.ConvTranspose2d(3, 6, 3, stride=2, groups=3, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(6, 4, 2),
            nn.Flatten(),
            nn.Linear(4 * 10 * 10, 4),
        ),
        (3, 3, 4, 4),
        None,
    ),
}


def _preserved(kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(unconverted model, its preserve=True conversion in train mode, an input batch)."""
    arch, shape, gn = PRESERVED[kind]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    plain = _trained_like(arch(), x)
    return plain, wsconvert.convert_model(copy.deepcopy(plain), gn=gn, preserve=True).train(), x


def _gain_shift(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith((".gain", ".shift"))}


@pytest.mark.parametrize("force_functorch", [False, True], ids=["hooks-mode", "functorch-mode"])
@pytest.mark.parametrize("kind", PRESERVED)
def test_preserve_per_sample_gradients_are_exact(kind: str, force_functorch: bool) -> None:
    """W_eff = gain * WS(W) + shift: per-sample gradients of W (and every other parameter) through the constant
    gain/shift equal one backward pass per example, and differ from those of the same model without them."""
    enable_opacus()
    _, model, x = _preserved(kind)
    y = torch.arange(len(x)) % 4
    standardized = [m for m in model.modules() if has_standardization(m)]
    assert len(standardized) == 2 and all(m.parametrizations.weight[0].gain is not None for m in standardized)
    expected = _per_example_grads(copy.deepcopy(model), x, y)
    without = copy.deepcopy(model)
    for m in without.modules():
        if has_standardization(m):
            m.parametrizations.weight[0].set_affine(None, None)
    unadapted = _per_example_grads(without, x, y)
    gsm = GradSampleModule(model, loss_reduction="sum", force_functorch=force_functorch)
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    names = [name for name, _ in model.named_parameters()]
    assert "0.parametrizations.weight.original" in names and not any("gain" in n or "shift" in n for n in names)
    for name, param, want in zip(names, model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad_sample, want, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(param.grad_sample.sum(0), param.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.allclose(expected[0], unadapted[0], atol=1e-4, rtol=1e-3), "gain/shift must matter"


def test_preserve_per_sample_gradients_follow_gain_shift_loaded_after_wrapping() -> None:
    """The functorch path reads the layer's current buffers at every backward: a load_state_dict into the
    wrapped model (new W and gain/shift) is seen, not the values at GradSampleModule time."""
    enable_opacus()
    _, model, x = _preserved("conv2d-gn=8")
    y = torch.tensor([0, 1, 2])
    gsm = GradSampleModule(model, loss_reduction="sum", force_functorch=True)
    other = _trained_like(PRESERVED["conv2d-gn=8"][0](), x)
    with torch.no_grad():
        for m in other.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(3.0).add_(0.2)
    other = wsconvert.convert_model(other, gn=8, preserve=True).train()
    before = _gain_shift(model)
    model.load_state_dict(other.state_dict())
    for key, value in _gain_shift(model).items():
        assert not torch.allclose(before[key], value), key
    expected = _per_example_grads(copy.deepcopy(other), x, y)
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    for (name, param), want in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad_sample, want, atol=1e-5, rtol=1e-4, msg=name)


def test_preserve_dp_sgd_with_make_private_trains_and_keeps_gain_shift() -> None:
    enable_opacus()
    plain, model, _ = _preserved("conv2d-gn=8")
    keys, gain_shift = list(model.state_dict()), _gain_shift(model)
    assert len(gain_shift) == 4
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    engine, steps = _dp_sgd_epoch(model)
    assert steps == 3 and 0 < engine.get_epsilon(delta=1e-5) < float("inf")
    after = model.state_dict()
    assert list(after) == keys  # the state-dict layout is untouched
    for key, value in gain_shift.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)  # constants, never trained
    for key in ("0.parametrizations.weight.original", "3.parametrizations.weight.original", "1.weight"):
        assert torch.isfinite(after[key]).all() and not torch.equal(after[key], before[key]), key
    # Only W moved: W_eff is gain * WS(W) + shift of the trained W.
    conv = model[0]
    ws = conv.parametrizations.weight[0]
    w_hat = wsconvert.ws.standardize.standardize_weight(conv.parametrizations.weight.original, ws.eps, ws.style)
    torch.testing.assert_close(conv.weight, ws.gain.view(-1, 1, 1, 1) * w_hat + ws.shift.view(-1, 1, 1, 1))


def test_preserve_other_buffers_of_trainable_layers_are_still_refused() -> None:
    """Only WeightStandardization gain/shift are exempt: BatchNorm kept by gn=None (running statistics are written
    from the batch) and any other buffer on a standardized conv are still reported, with Opacus's message."""
    enable_opacus()
    model = wsconvert.convert_model(tiny_cnn(bias=False), preserve=True)  # gn=None: BatchNorm stays
    errors = GradSampleModule.validate(model, strict=False)
    assert [str(e).split("support(")[1].split(":")[0] for e in errors] == ["1", "4"]  # the two BatchNorms
    with pytest.raises(NotImplementedError, match=r"trainable layer with buffers"):
        GradSampleModule(model)
    converted = wsconvert.convert_model(tiny_cnn(bias=True), gn=4, preserve=True)
    assert GradSampleModule.validate(converted, strict=True) == []
    converted[3].register_buffer("extra", torch.zeros(1))
    errors = GradSampleModule.validate(converted, strict=False)
    assert len(errors) == 1 and "(3:" in str(errors[0])


def _without_enable_opacus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo enable_opacus() for one test (it patches process-wide; each patch keeps the original as __wrapped__)."""
    from opacus.grad_sample import grad_sample_module as gsm

    enable_opacus()
    hooks = gsm.GradSampleHooks
    monkeypatch.setattr(hooks, "iterate_submodules", hooks.iterate_submodules.__wrapped__)
    monkeypatch.setattr(hooks, "validate", hooks.__dict__["validate"].__func__.__wrapped__)
    for name in ("requires_grad", "prepare_layer", "ft_compute_per_sample_gradient"):
        monkeypatch.setattr(gsm, name, getattr(gsm, name).__wrapped__)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_preserve_without_enable_opacus_opacus_names_the_buffers(monkeypatch: pytest.MonkeyPatch, bias: bool) -> None:
    """What a user who forgot enable_opacus() sees (documented in docs/integrations.md): Opacus's refusal, naming
    the conv's parametrization and its gain/shift; with enable_opacus() the same model is accepted."""
    _without_enable_opacus(monkeypatch)
    model = wsconvert.convert_model(tiny_cnn(bias), gn=4, preserve=True)
    with pytest.raises(NotImplementedError) as info:
        GradSampleModule(model, loss_reduction="sum")
    message = str(info.value)
    assert "trainable layer with buffers" in message and "gain/shift (Adaptive WS)" in message
    assert "(0.parametrizations.weight:ParametrizationList" in message  # the layer owning W
    assert ("(0:ParametrizedConv2d" in message) is bias  # a conv owning its bias is a trainable layer too
    with pytest.raises(NotImplementedError, match=r"This layer has buffers and is not supported by Opacus"):
        GradSampleModule(model, loss_reduction="sum", strict=False)  # functorch's own check
    monkeypatch.undo()
    enable_opacus()
    GradSampleModule(wsconvert.convert_model(tiny_cnn(bias), gn=4, preserve=True), loss_reduction="sum")


def test_ghost_clipping_with_preserve_fails_clearly() -> None:
    """Not covered (docs/integrations.md): the ghost-clipping module prepares the layer with Opacus's own functorch
    code, which refuses the buffers by name instead of computing wrong gradients."""
    enable_opacus()
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    _, model, x = _preserved("conv2d-gn=8")
    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", use_ghost_clipping=True)
    with pytest.raises(NotImplementedError, match=r"This layer has buffers"):
        nn.functional.cross_entropy(gsm(x), torch.tensor([0, 1, 2]), reduction="sum").backward()
