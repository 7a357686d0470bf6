"""recompute_in_backward: W_hat is not kept from forward to backward, and nothing else changes."""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint

from wsconvert import (
    WeightStandardization,
    WSConvertError,
    bake,
    convert_model,
    recompute_in_backward,
    recomputes_in_backward,
)


def _pair(make: Callable[[], nn.Module], **options: object) -> tuple[nn.Module, nn.Module]:
    """(converted model, the same converted model with recompute_in_backward), equal weights."""
    torch.manual_seed(0)
    saving = convert_model(make(), **options)
    recomputing = copy.deepcopy(saving)
    recompute_in_backward(recomputing)
    return saving, recomputing


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out.float() ** 2).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


class Shared(nn.Module):
    """One conv applied twice: two forwards, two saved W_hat, one parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.conv(x)))


# name: (model factory, input shape, convert options, bitwise): every layout and style the WS math handles.
CASES = {
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)), (2, 3, 9, 9), {}, True),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 8, 5), nn.Conv1d(8, 4, 3)), (2, 3, 20), {}, True),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(3, 4, 3)), (1, 3, 6, 6, 6), {}, True),
    "grouped": (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, groups=4)), (2, 8, 7, 7), {}, True),
    "transposed": (lambda: nn.Sequential(nn.ConvTranspose2d(8, 6, 3, groups=2)), (2, 8, 5, 5), {}, False),
    "paper style": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3)), (2, 3, 9, 9), {"style": "paper"}, False),
    "shared conv": (Shared, (2, 6, 8, 8), {}, True),
    "resnet18 gn": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32), {"gn": 32}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_are_unchanged(case):
    make, shape, options, bitwise = CASES[case]
    saving, recomputing = _pair(make, **options)
    x = torch.randn(shape)
    expected, got = _grads(saving, x), _grads(recomputing, x)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        if bitwise:  # CPU: (W - mean) * rstd is exactly what native_layer_norm computed
            assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
        else:
            assert_close(got[name], expected[name], msg=name)


def test_channels_last_weights():
    saving, recomputing = _pair(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)))
    saving, recomputing = (m.to(memory_format=torch.channels_last) for m in (saving, recomputing))
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    expected, got = _grads(saving, x), _grads(recomputing, x)
    for name in expected:
        assert_close(got[name], expected[name], msg=name)


def _live_w_hat_after_forward(model: nn.Module, x: torch.Tensor) -> int:
    """How many W_hat tensors are still alive between forward and backward."""
    refs: list[weakref.ref] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out: refs.append(weakref.ref(out)))
        for m in model.modules()
        if isinstance(m, WeightStandardization)
    ]
    out = model(x)
    alive = sum(ref() is not None for ref in refs)
    out.sum().backward()
    for handle in handles:
        handle.remove()
    return alive


@pytest.mark.parametrize("case", ["conv2d", "shared conv", "resnet18 gn"])
def test_w_hat_is_not_kept_until_backward(case):
    make, shape, options, _ = CASES[case]
    saving, recomputing = _pair(make, **options)
    x = torch.randn(shape)
    convs = sum(isinstance(m, WeightStandardization) for m in saving.modules())
    forwards = 2 if case == "shared conv" else convs
    assert _live_w_hat_after_forward(saving, x) == forwards  # the conv keeps each W_hat for its backward
    assert _live_w_hat_after_forward(recomputing, x) == 0


def test_double_backward_keeps_the_path_to_w():
    saving, recomputing = _pair(lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.Tanh(), nn.Conv2d(6, 2, 3)))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    results = []
    for model in (saving, recomputing):
        model.zero_grad(set_to_none=True)
        (gx,) = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()  # gradient penalty: second order through W_hat -> W
        results.append([p.grad.clone() for p in model.parameters()])
    for expected, got in zip(*results, strict=True):
        assert_close(got, expected)


def test_retain_graph_allows_a_second_backward():
    saving, recomputing = _pair(lambda: nn.Sequential(nn.Conv2d(3, 6, 3)))
    x = torch.randn(2, 3, 8, 8)
    out = recomputing(x).sum()
    out.backward(retain_graph=True)
    first = recomputing[0].parametrizations.weight.original.grad.clone()
    out.backward()
    assert_close(recomputing[0].parametrizations.weight.original.grad, 2 * first)


def test_changing_w_between_forward_and_backward_is_a_clear_error():
    _, recomputing = _pair(lambda: nn.Sequential(nn.Conv2d(3, 6, 3)))
    out = recomputing(torch.randn(2, 3, 8, 8)).sum()
    with torch.no_grad():
        recomputing[0].parametrizations.weight.original.add_(1)
    with pytest.raises(WSConvertError, match="modified in place between forward and backward"):
        out.backward()


def test_a_failing_forward_leaves_no_hooks_behind():
    _, recomputing = _pair(lambda: nn.Sequential(nn.Conv2d(3, 6, 3)))
    with pytest.raises(RuntimeError):
        recomputing(torch.randn(2, 5, 8, 8))  # wrong channel count: the conv raises inside the hooks
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    _grads(recomputing, torch.randn(2, 3, 8, 8))  # and it still trains


STEPS_ASIDE = {
    "no_grad forward": lambda model, x: _no_grad(model, x),
    "non-reentrant checkpoint": lambda model, x: checkpoint(model, x, use_reentrant=False),
    "bf16 autocast": lambda model, x: _autocast(model, x),
}


def _no_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        model(x)
    return model(x)


def _autocast(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x).float()


@pytest.mark.parametrize("context", list(STEPS_ASIDE))
def test_other_contexts_compute_the_same_gradients(context):
    saving, recomputing = _pair(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    x = torch.randn(2, 3, 9, 9)
    grads = []
    for model in (saving, recomputing):
        model.zero_grad(set_to_none=True)
        STEPS_ASIDE[context](model, x).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for expected, got in zip(*grads, strict=True):
        assert_close(got, expected)


def test_compiled_training_matches_eager():
    saving, recomputing = _pair(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    x = torch.randn(2, 3, 9, 9)
    expected = _grads(saving, x)
    compiled = torch.compile(recomputing, backend="aot_eager", fullgraph=False)
    recomputing.zero_grad(set_to_none=True)
    compiled(x).pow(2).mean().backward()
    for name, p in recomputing.named_parameters():
        # Compiled WS uses var_mean + rsqrt (wsconvert.ws.standardize): same formula, different rounding.
        assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-4)


def test_switching_on_and_off():
    model = convert_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)), gn=None)
    assert recompute_in_backward(model) == 2
    assert recompute_in_backward(model) == 0  # already on: no second set of hooks
    assert all(recomputes_in_backward(model[i]) for i in (0, 2))
    assert len(model[0]._forward_pre_hooks) == 1
    assert recompute_in_backward(model, enabled=False) == 2
    assert not recomputes_in_backward(model[0])
    assert not model[0]._forward_pre_hooks and not model[0]._forward_hooks
    assert not model[0]._forward_hooks_always_called
    assert _live_w_hat_after_forward(model, torch.randn(1, 3, 9, 9)) == 2


def test_copies_get_their_own_hooks_and_bake_drops_them():
    model = convert_model(nn.Sequential(nn.Conv2d(3, 8, 3)), gn=None)
    recompute_in_backward(model)
    twin = copy.deepcopy(model)
    assert recomputes_in_backward(twin[0])
    assert _live_w_hat_after_forward(twin, torch.randn(1, 3, 9, 9)) == 0
    baked = bake(model)
    assert not recomputes_in_backward(baked[0]) and not baked[0]._forward_pre_hooks
    assert recomputes_in_backward(model[0])


def test_models_without_standardized_convs_and_bad_values():
    assert recompute_in_backward(nn.Sequential(nn.Conv2d(3, 8, 3))) == 0
    with pytest.raises(WSConvertError, match="enabled='yes' must be True or False"):
        recompute_in_backward(nn.Sequential(), enabled="yes")


def test_training_loop_with_optimizer_steps():
    saving, recomputing = _pair(lambda: torchvision.models.resnet18(num_classes=10), gn=32)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    losses = []
    for model in (saving, recomputing):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        run = []
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1]


def _hooks_active_inside_conv(model: nn.Module, run: Callable[[], object]) -> list[bool]:
    """Whether saved-tensor hooks were active while each standardized conv computed its W_hat."""
    seen: list[bool] = []
    probe = torch._C._autograd._top_saved_tensors_default_hooks
    handles = [
        m.register_forward_pre_hook(lambda *_: seen.append(probe(False) is not None))
        for m in model.modules()
        if isinstance(m, WeightStandardization)
    ]
    run()
    for handle in handles:
        handle.remove()
    return seen


def test_hooks_are_only_entered_where_they_save_memory():
    _, recomputing = _pair(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)))
    x = torch.randn(2, 3, 9, 9)
    assert _hooks_active_inside_conv(recomputing, lambda: recomputing(x)) == [True, True]
    assert _hooks_active_inside_conv(recomputing, lambda: _autocast(recomputing, x)) == [False, False]
    with torch.no_grad():
        assert _hooks_active_inside_conv(recomputing, lambda: recomputing(x)) == [False, False]


def test_concurrent_threads_get_the_sequential_gradients():
    """Hook state is per thread; two threads training one model must add up to the same gradients."""
    saving, recomputing = _pair(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    inputs = [torch.randn(2, 3, 9, 9) for _ in range(2)]
    for x in inputs:
        saving(x).pow(2).mean().backward()
    errors: list[BaseException] = []

    def work(x: torch.Tensor) -> None:
        try:
            recomputing(x).pow(2).mean().backward()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(x,)) for x in inputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for (name, expected), got in zip(saving.named_parameters(), recomputing.parameters(), strict=True):
        assert_close(got.grad, expected.grad, msg=name)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
