"""The short read path for ``conv.weight`` (wsconvert.ws.cached_weight): same tensor as parametrize's getter, and
parametrize's getter whenever skipping its machinery could change what anyone observes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, contextmanager

import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.nn.utils import parametrize
from torch.testing import assert_close

from wsconvert import WeightStandardization, bake, convert_model, standardize_weight
from wsconvert.ws import cached_weight as short_read


def converted_conv() -> nn.Conv2d:
    return convert_model(nn.Sequential(nn.Conv2d(4, 6, 3)), gn=None)[0]


def chain(conv: nn.Module) -> parametrize.ParametrizationList:
    return conv.parametrizations.weight


def ws(conv: nn.Module) -> WeightStandardization:
    return chain(conv)[0]


def read(conv: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return conv.weight


def served(conv: nn.Module) -> torch.Tensor | None:
    """What the short path would return for a read under no_grad right now."""
    with torch.no_grad():
        return ws(conv).cached_result(chain(conv).original)


def test_convert_model_installs_the_short_path_once():
    conv = converted_conv()
    getter = type(conv).weight.fget
    assert getattr(getter, "_wsconvert_fast", False)
    short_read.install(conv)
    assert type(conv).weight.fget is getter  # idempotent: no wrapper around the wrapper


def test_a_warm_read_returns_the_cached_tensor_itself():
    conv = converted_conv()
    first = read(conv)
    assert served(conv) is first
    assert read(conv) is first
    assert_close(first, standardize_weight(chain(conv).original.detach()), rtol=0, atol=0)


def test_a_cold_read_fills_the_cache_through_parametrize():
    conv = converted_conv()
    assert ws(conv)._cached is None
    first = read(conv)
    assert ws(conv)._cached is not None and ws(conv)._cached[2] is first


def test_a_changed_weight_is_never_served_from_the_cache():
    conv = converted_conv()
    old = read(conv)
    with torch.no_grad():
        chain(conv).original.mul_(2).add_(1)
    assert served(conv) is None
    new = read(conv)
    assert new is not old
    assert_close(new, standardize_weight(chain(conv).original.detach()), rtol=0, atol=0)


def test_grad_enabled_reads_record_the_graph():
    conv = converted_conv()
    read(conv)
    weight = conv.weight  # grad enabled: a fresh, differentiable W_hat
    assert weight.grad_fn is not None
    weight.sum().backward()
    assert chain(conv).original.grad is not None


@contextmanager
def _hooked(register: Callable[[Callable[..., None]], torch.utils.hooks.RemovableHandle]):
    calls: list[int] = []
    handle = register(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


# Every case: something that must observe a read; parametrize's own getter has to run for it to.
HOOK_CASES = {
    "forward hook on the ParametrizationList": lambda conv: chain(conv).register_forward_hook,
    "forward pre-hook on the ParametrizationList": lambda conv: chain(conv).register_forward_pre_hook,
    "forward hook on the parametrization": lambda conv: ws(conv).register_forward_hook,
    "forward pre-hook on the parametrization": lambda conv: ws(conv).register_forward_pre_hook,
    "global forward hook": lambda conv: register_module_forward_hook,
    "global forward pre-hook": lambda conv: register_module_forward_pre_hook,
}


@pytest.mark.parametrize("where", list(HOOK_CASES))
def test_hooks_still_see_every_read(where):
    conv = converted_conv()
    read(conv)
    with _hooked(HOOK_CASES[where](conv)) as calls:
        read(conv)
        read(conv)
    assert len(calls) >= 2
    cached = read(conv)
    assert read(conv) is cached  # hook gone: the short path is back


def test_parametrize_cached_context_keeps_its_own_semantics():
    conv = converted_conv()
    read(conv)
    with parametrize.cached():
        inside = conv.weight  # grad enabled inside the context: parametrize caches the graph-carrying W_hat
        assert inside.grad_fn is not None
        assert conv.weight is inside


def test_a_second_parametrization_is_applied():
    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    conv = converted_conv()
    read(conv)
    parametrize.register_parametrization(conv, "weight", Double(), unsafe=True)
    assert_close(read(conv), 2 * standardize_weight(chain(conv).original.detach()))


def test_cache_disabled_means_no_short_path():
    conv = nn.Conv2d(4, 6, 3)
    parametrize.register_parametrization(conv, "weight", WeightStandardization(cache=False), unsafe=True)
    short_read.install(conv)
    assert read(conv) is not read(conv)


def test_switching_the_cache_off_later_stops_serving_it():
    """cache=False must mean recompute even when an old entry is still there (e.g. after a .data edit)."""
    conv = converted_conv()
    old = read(conv)
    with torch.no_grad():
        chain(conv).original.data.mul_(2).add_(1)  # .data edit: no version bump, the key cannot see it
    ws(conv).cache = False
    assert served(conv) is None
    assert_close(read(conv), standardize_weight(chain(conv).original.detach()), rtol=0, atol=0)
    assert not torch.equal(read(conv), old)


def test_tracing_computes_through_parametrize():
    conv = converted_conv().eval()
    read(conv)
    traced = torch.jit.trace(conv, torch.randn(1, 4, 5, 5))
    # The trace recorded the standardization; it follows later changes of W.
    with torch.no_grad():
        chain(conv).original.mul_(3).add_(0.5)
        x = torch.randn(2, 4, 5, 5)
        assert_close(traced(x), conv(x))


def test_copies_and_bake_keep_working():
    model = convert_model(nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 1)), gn=None).eval()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        expected = model(x)
        twin = copy.deepcopy(model)
        with torch.no_grad():
            chain(twin[0]).original.add_(1)  # the copy's cache must not leak into the original, nor back
        assert_close(model(x), expected, rtol=0, atol=0)
        assert not torch.equal(twin(x), expected)
        baked = bake(model)
        assert_close(baked(x), expected, rtol=0, atol=0)
        assert_close(model(x), expected, rtol=0, atol=0)
    assert not parametrize.is_parametrized(baked[0])


def test_remove_parametrizations_removes_the_short_path_with_the_property():
    conv = converted_conv()
    expected = read(conv).clone()
    parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
    assert type(conv) is nn.Conv2d
    assert isinstance(conv.weight, nn.Parameter)
    assert_close(conv.weight.detach(), expected)


def _no_context() -> AbstractContextManager:
    return ExitStack()


@pytest.mark.parametrize("context", [_no_context, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_short_path_results_match_a_fresh_model(context):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    model = convert_model(plain, gn=None).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad(), context():
        first = model(x)
        second = model(x)
    uncached = convert_model(plain, gn=None, inplace=False).eval()
    for module in uncached.modules():
        if isinstance(module, WeightStandardization):
            module.cache = False
    with torch.no_grad():
        assert_close(first, uncached(x), rtol=0, atol=0)
    assert_close(second, first, rtol=0, atol=0)
