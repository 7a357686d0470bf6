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


def test_dp_sgd_with_make_private_trains() -> None:
    enable_opacus()
    torch.manual_seed(0)
    model = wsconvert.convert_model(tiny_cnn(bias=False), gn=4)
    before = copy.deepcopy(model.state_dict())
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
    enable_opacus()
    assert gsm.GradSampleHooks.iterate_submodules is walk
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
