"""The eval-time cache of WeightStandardization: reused while W is unchanged, never stale after W changes."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

from wsconvert import WeightStandardization, bake, convert_model, standardize_weight
from wsconvert.ws import cached_weight as short_read


def ws_conv(**kwargs: object) -> nn.Conv2d:
    """A standardized conv set up as convert_model sets it up, short read path included."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    parametrize.register_parametrization(conv, "weight", WeightStandardization(**kwargs))
    short_read.install(conv)
    return conv


def original(conv: nn.Module) -> nn.Parameter:
    return conv.parametrizations.weight.original


def parametrization(conv: nn.Module) -> WeightStandardization:
    return conv.parametrizations.weight[0]


def fresh(conv: nn.Module) -> torch.Tensor:
    """W_hat computed from scratch from the conv's current W, bypassing every cache."""
    with torch.no_grad():
        return standardize_weight(original(conv).detach().clone())


def cached_weight(conv: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return conv.weight


def test_no_grad_reuses_the_same_tensor_while_w_is_unchanged():
    conv = ws_conv()
    first = cached_weight(conv)
    assert cached_weight(conv) is first
    assert_close(first, fresh(conv), rtol=0, atol=0)


def test_inference_mode_fills_a_normal_tensor_that_serves_both_modes():
    """An inference tensor has no version counter (in-place edits of it could not be seen) and must not leak
    out of inference mode: the cache is filled with a normal tensor, which serves no_grad reads as well."""
    conv = ws_conv()
    with torch.inference_mode():
        first = conv.weight
        assert conv.weight is first
        assert not first.is_inference()
        assert first.grad_fn is None
    outside = cached_weight(conv)
    assert outside is first
    assert_close(outside, fresh(conv), rtol=0, atol=0)
    # and a later training forward can save it for backward (inference tensors could not be)
    conv(torch.randn(1, 4, 5, 5)).sum().backward()
    assert original(conv).grad is not None


@pytest.mark.parametrize("eval_mode", [False, True], ids=["train-mode", "eval-mode"])
def test_grad_enabled_forward_never_uses_the_cache(eval_mode):
    conv = ws_conv()
    conv.train(not eval_mode)
    cached = cached_weight(conv)
    live = conv.weight  # grad enabled, W requires grad: must be a fresh, differentiable W_hat
    assert live is not cached
    assert live.grad_fn is not None
    assert parametrization(conv)._cached is None  # a grad-enabled forward drops the cache
    live.sum().backward()
    assert original(conv).grad is not None


def test_frozen_weight_is_cached_even_with_grad_enabled():
    conv = ws_conv()
    original(conv).requires_grad_(False)
    first = conv.weight
    assert conv.weight is first
    original(conv).requires_grad_(True)  # unfrozen: gradients must flow again
    assert conv.weight.grad_fn is not None


def test_cache_false_recomputes_every_time():
    conv = ws_conv(cache=False)
    first = cached_weight(conv)
    assert cached_weight(conv) is not first
    assert parametrization(conv)._cached is None


def _optimizer_step(conv: nn.Module) -> None:
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.5, momentum=0.9)
    for p in conv.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()


def _adam_foreach_step(conv: nn.Module) -> None:
    optimizer = torch.optim.AdamW(conv.parameters(), lr=0.5, foreach=True)
    for p in conv.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()


def _load_state_dict(conv: nn.Module) -> None:
    other = ws_conv()
    conv.load_state_dict(other.state_dict())


def _load_plain_checkpoint(conv: nn.Module) -> None:
    torch.nn.init.normal_(plain := nn.Conv2d(4, 6, 3, padding=1).weight)
    state = {"parametrizations.weight.original": plain.detach(), "bias": torch.zeros(6)}
    conv.load_state_dict(state)


def _in_place_mul(conv: nn.Module) -> None:
    with torch.no_grad():
        original(conv).mul_(torch.rand_like(original(conv)) + 0.5)


def _in_place_single_element(conv: nn.Module) -> None:
    with torch.no_grad():
        original(conv)[2, 1, 0, 0] += 3.0


def _in_place_via_detach(conv: nn.Module) -> None:
    original(conv).detach().add_(torch.randn_like(original(conv)))


def _init_function(conv: nn.Module) -> None:
    nn.init.kaiming_normal_(original(conv))


def _copy_from_other_tensor(conv: nn.Module) -> None:
    with torch.no_grad():
        original(conv).copy_(torch.randn_like(original(conv)))


def _swap_in_new_parameter(conv: nn.Module) -> None:
    conv.parametrizations.weight.original = nn.Parameter(torch.randn_like(original(conv)))


def _data_assignment(conv: nn.Module) -> None:
    original(conv).data = torch.randn_like(original(conv))


MUTATIONS = {
    "sgd-step": _optimizer_step,
    "adamw-foreach-step": _adam_foreach_step,
    "load_state_dict": _load_state_dict,
    "load-plain-checkpoint": _load_plain_checkpoint,
    "in-place-mul": _in_place_mul,
    "in-place-one-element": _in_place_single_element,
    "in-place-via-detach": _in_place_via_detach,
    "nn.init": _init_function,
    "copy_": _copy_from_other_tensor,
    "new-parameter": _swap_in_new_parameter,
    "data-assignment": _data_assignment,
}


@pytest.mark.parametrize("mutate", list(MUTATIONS.values()), ids=list(MUTATIONS))
def test_changes_to_w_invalidate_the_cache(mutate):
    conv = ws_conv()
    before = cached_weight(conv).clone()
    mutate(conv)
    after = cached_weight(conv)
    assert not torch.equal(after, before), "W changed but the cached W_hat was returned"
    assert_close(after, fresh(conv), rtol=0, atol=0)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = nn.functional.conv2d(x, fresh(conv), conv.bias, padding=1)
        assert_close(conv(x), expected, rtol=0, atol=0)


def test_no_stale_values_over_a_long_mixed_sequence():
    conv = ws_conv()
    x = torch.randn(2, 4, 5, 5)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    steps = list(MUTATIONS.values()) * 2
    for i, mutate in enumerate(steps):
        if i % 3 == 0:  # a real training step between the mutations
            optimizer.zero_grad()
            conv(x).square().mean().backward()
            optimizer.step()
        else:
            mutate(conv)
            optimizer = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)  # W may be a new Parameter
        for _ in range(2):  # the second read is a cache hit
            assert_close(cached_weight(conv), fresh(conv), rtol=0, atol=0)


def test_data_edits_hide_the_version_bump_and_clear_cache_recovers():
    """``param.data.<op>_()`` bypasses the version counter (documented); clear_cache() is the remedy."""
    conv = ws_conv()
    cached_weight(conv)
    original(conv).data.mul_(2.0).add_(1.0)
    parametrization(conv).clear_cache()
    assert_close(cached_weight(conv), fresh(conv), rtol=0, atol=0)


def test_eval_after_training_with_data_edits_sees_fresh_weights():
    """A legacy loop updates W through ``.data`` in train mode; ``model.eval()`` then clears the cache."""
    model = nn.Sequential(ws_conv(), nn.ReLU())
    model.eval()
    cached_weight(model[0])
    model.train()
    original(model[0]).data.add_(0.5 * torch.randn_like(original(model[0])))  # no version bump
    model.eval()
    assert_close(cached_weight(model[0]), fresh(model[0]), rtol=0, atol=0)


def test_train_and_eval_calls_clear_the_cache():
    conv = ws_conv()
    for switch in (conv.eval, conv.train):
        cached_weight(conv)
        assert parametrization(conv)._cached is not None
        switch()
        assert parametrization(conv)._cached is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_moves_invalidate_the_cache(dtype):
    conv = ws_conv()
    cached_weight(conv)
    conv.to(dtype)
    assert parametrization(conv)._cached is None  # .to() clears it
    got = cached_weight(conv)
    assert got.dtype == dtype
    assert_close(got, standardize_weight(original(conv).detach()), rtol=0, atol=0)
    conv.float()  # and back: the float32 result is recomputed from the round-tripped W
    assert_close(cached_weight(conv), fresh(conv), rtol=0, atol=0)


def test_move_to_meta_device_invalidates_the_cache():
    conv = ws_conv()
    cached_weight(conv)
    conv.to("meta")
    got = cached_weight(conv)
    assert got.device.type == "meta"
    assert got.shape == (6, 4, 3, 3)


def test_move_with_swap_tensors_invalidates_the_cache():
    """``torch.__future__.set_swap_module_params_on_conversion``: .to() swaps the Parameter's contents in place."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        conv = ws_conv()
        cached_weight(conv)
        conv.to(torch.float64)
        got = cached_weight(conv)
        assert got.dtype == torch.float64
        assert_close(got, standardize_weight(original(conv).detach()), rtol=0, atol=0)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def test_cpu_to_cpu_copies_get_their_own_cache():
    conv = ws_conv()
    cached_weight(conv)
    twin = copy.deepcopy(conv)
    assert parametrization(twin)._cached is None  # copies start without the original's cache
    assert_close(cached_weight(twin), cached_weight(conv), rtol=0, atol=0)
    _in_place_mul(twin)
    assert_close(cached_weight(twin), fresh(twin), rtol=0, atol=0)
    assert_close(cached_weight(conv), fresh(conv), rtol=0, atol=0)  # the original is untouched
    assert not torch.equal(cached_weight(conv), cached_weight(twin))
    conv.to("cpu")  # a same-device move: the cache is dropped and rebuilt with the same values
    assert parametrization(conv)._cached is None
    assert_close(cached_weight(conv), fresh(conv), rtol=0, atol=0)


def test_converted_model_eval_cache_matches_uncached_outputs():
    model = convert_model(torchvision.models.resnet18(num_classes=10), gn=None).eval()
    uncached = copy.deepcopy(model)
    for module in uncached.modules():
        if isinstance(module, WeightStandardization):
            module.cache = False
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)  # fills the cache
        assert torch.equal(model(x), uncached(x))
    # a training step on the converted model, then eval again: no stale W_hat anywhere
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).logsumexp(1).sum().backward()
    optimizer.step()
    model.eval()
    uncached.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), uncached(x))


def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def _resnet18_channels_last() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10).to(memory_format=torch.channels_last)


def _timm_regnet() -> nn.Module:
    import timm

    return timm.create_model("regnety_002", pretrained=False, num_classes=10)


def _mixed_convs() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 4, 3),
        nn.ConvTranspose1d(4, 6, 3, groups=2),
        nn.Conv1d(6, 6, 3, groups=6),
    )


BAKE_CASES = {
    "resnet18": (_resnet18, (2, 3, 32, 32), {}),
    "resnet18-channels-last": (_resnet18_channels_last, (2, 3, 32, 32), {}),
    "resnet18-paper-style": (_resnet18, (2, 3, 32, 32), {"style": "paper"}),
    "timm-regnety_002-gn": (_timm_regnet, (2, 3, 32, 32), {"gn": 8}),
    "conv1d-transposed-depthwise": (_mixed_convs, (2, 3, 12), {}),
}


@pytest.mark.parametrize(("make", "shape", "options"), list(BAKE_CASES.values()), ids=list(BAKE_CASES))
def test_baked_model_is_bitwise_equal_to_the_parametrized_model_in_eval(make, shape, options):
    model = convert_model(make(), **options)
    x = torch.randn(*shape)
    if len(shape) == 4 and next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()  # weights move away from their initial values first
    optimizer.step()
    model.eval()
    baked = bake(model)
    assert not any(isinstance(m, WeightStandardization) for m in baked.modules())
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(baked(x), expected)
        assert torch.equal(model(x), expected)  # and the cached second call too
    with torch.inference_mode():
        assert torch.equal(baked(x), model(x))
