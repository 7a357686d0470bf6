"""The eval cache cannot be fooled (issue 10): every optimizer implementation torch ships, update paths that skip
W's version counter, in-place edits of the tensor ``conv.weight`` returned, models converted under inference
mode, and ``conv.weight = X``.

Every check compares against a copy that never caches (``cache=False``), bitwise.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

from wsconvert import (
    UnsupportedModuleError,
    WeightStandardization,
    WSConvertError,
    convert_model,
    standardize_weight,
)
from wsconvert.ws import cached_weight as short_read

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """conftest's one_thread for every test here (the machine is shared)."""


def small_model(device: str = "cpu", *, inplace: bool = False) -> nn.Module:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    return convert_model(plain, gn=None, inplace=inplace).to(device).eval()


def ws_linear(device: str = "cpu") -> nn.Module:
    """WS on a 2-D weight, for optimizers that only take matrices (Muon)."""
    torch.manual_seed(0)
    linear = nn.Linear(12, 6, bias=False)
    parametrize.register_parametrization(linear, "weight", WeightStandardization(), unsafe=True)
    short_read.install(linear)
    return nn.Sequential(nn.Flatten(), linear).to(device).eval()


def uncached(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (its current W) that computes W_hat from scratch on every call."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, WeightStandardization):
            module.cache = False
    return twin


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.parametrizations.weight.original for m in model.modules() if parametrize.is_parametrized(m, "weight")]


def assert_fresh(model: nn.Module, x: torch.Tensor, context: Callable[[], AbstractContextManager] = torch.no_grad):
    """Cached reads and forwards (twice: fill, then hit) equal what a never-caching copy computes now."""
    reference = uncached(model)
    with context():
        expected = reference(x)
        for _ in range(2):
            assert_close(model(x), expected, rtol=0, atol=0)
        for module in model.modules():
            if parametrize.is_parametrized(module, "weight"):
                w = module.parametrizations.weight.original
                assert_close(module.weight, standardize_weight(w.detach()), rtol=0, atol=0)


# --- point 1: every optimizer torch ships, every implementation -----------------------------------------------------


def _optimizer_classes() -> list[type[torch.optim.Optimizer]]:
    found = {
        cls
        for cls in vars(torch.optim).values()
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    }
    return sorted(found, key=lambda cls: cls.__name__)


def _fused_supported(cls: type[torch.optim.Optimizer], device: str) -> bool:
    """Whether torch offers ``fused=True`` for ``cls`` on ``device`` (its constructor refuses it otherwise)."""
    try:
        cls([nn.Parameter(torch.zeros(2, 2, device=device))], lr=0.1, fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def _implementations(cls: type[torch.optim.Optimizer], device: str) -> list[dict[str, bool]]:
    accepted = inspect.signature(cls.__init__).parameters
    variants = []
    if "foreach" in accepted:
        variants += [{"foreach": False}, {"foreach": True}]
    if "fused" in accepted and _fused_supported(cls, device):
        variants.append({"fused": True})
    if "capturable" in accepted and device == "cuda":
        variants.append({"capturable": True, "foreach": True})
    return variants or [{}]  # LBFGS, SparseAdam, Muon: one implementation


OPTIMIZER_CASES = [
    pytest.param(cls, flags, device, id=f"{cls.__name__}-{'-'.join(f'{k}' for k in flags) or 'only'}-{device}")
    for device in DEVICES
    for cls in _optimizer_classes()
    for flags in _implementations(cls, device)
]


def test_the_optimizer_table_covers_fused_kernels():
    """Fused steps do not bump W's version counter: the table must hold them, or it tests nothing new."""
    fused = {param.values[0].__name__ for param in OPTIMIZER_CASES if param.values[1].get("fused")}
    assert {"SGD", "Adam", "AdamW"} <= fused
    assert len({param.values[0] for param in OPTIMIZER_CASES}) == len(_optimizer_classes()) >= 14


@pytest.mark.parametrize(("cls", "flags", "device"), OPTIMIZER_CASES)
def test_every_optimizer_step_invalidates_the_cache(cls, flags, device):
    """A training forward, an eval forward on the side (fills the cache), backward, step, eval again."""
    model = ws_linear(device) if cls.__name__ == "Muon" else small_model(device)
    x = torch.randn(2, 3, 2, 2, device=device) if cls.__name__ == "Muon" else torch.randn(2, 3, 8, 8, device=device)
    optimizer = cls(model.parameters(), lr=0.1, **flags)
    before = [w.detach().clone() for w in weights(model)]

    def forward_backward() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(x).square().mean()
        with torch.no_grad():
            model(x)  # e.g. metrics on the same batch: fills the cache after the grad-enabled forward dropped it
        loss.backward()
        if cls is torch.optim.SparseAdam:
            for p in model.parameters():
                p.grad = p.grad.to_sparse()
        return loss

    if cls is torch.optim.LBFGS:
        optimizer.step(forward_backward)
    else:
        forward_backward()
        optimizer.step()
    assert any(not torch.equal(b, w) for b, w in zip(before, weights(model), strict=True)), "the step did not change W"
    assert_fresh(model, x)


COMPILED_STEPS = {
    "AdamW-fused": (torch.optim.AdamW, {"fused": True}),
    "SGD-momentum-foreach": (torch.optim.SGD, {"foreach": True, "momentum": 0.9}),
}


@pytest.mark.parametrize(("cls", "flags"), list(COMPILED_STEPS.values()), ids=list(COMPILED_STEPS))
def test_a_compiled_optimizer_step_invalidates_the_cache(cls, flags):
    """torch.compile of ``optimizer.step`` still runs the global step hooks (dynamo replays their side effect)."""
    model = small_model()
    x = torch.randn(2, 3, 8, 8)
    optimizer = cls(model.parameters(), lr=0.1, **flags)
    step = torch.compile(optimizer.step, backend="eager")
    for _ in range(2):  # the first call compiles, the second runs the compiled step
        optimizer.zero_grad()
        model(x).square().mean().backward()
        with torch.no_grad():
            model(x)
        step()
        assert_fresh(model, x)


def test_a_step_that_fails_halfway_still_invalidates():
    """The pre-step hook: an optimizer that writes W and then raises leaves no stale W_hat behind."""

    class Failing(torch.optim.Optimizer):
        def __init__(self, params: object) -> None:
            super().__init__(params, {})

        def step(self, closure: object = None) -> None:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.data.add_(1.0)  # no version bump
            raise RuntimeError("boom")

    model = small_model()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="boom"):
        Failing(model.parameters()).step()
    assert_fresh(model, x)


def test_invalidate_all_caches_covers_updates_outside_torch_optim():
    """A functional fused update (no Optimizer, no step hooks, no version bump), then the documented remedy."""
    from torch.optim.adam import adam

    model = small_model()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
        params = weights(model)
        zeros = [torch.zeros_like(p) for p in params]
        adam(
            params,
            [torch.randn_like(p) for p in params],
            [z.clone() for z in zeros],
            [z.clone() for z in zeros],
            [],
            [torch.tensor(0.0) for _ in params],
            fused=True,
            amsgrad=False,
            beta1=0.9,
            beta2=0.999,
            lr=0.5,
            weight_decay=0.0,
            eps=1e-8,
            maximize=False,
        )
    WeightStandardization.invalidate_all_caches()
    assert_fresh(model, x)


def _swap_tensors(model: nn.Module) -> None:
    w = weights(model)[0]
    torch.utils.swap_tensors(w, nn.Parameter(torch.randn_like(w)))


def _swap_there_edit_and_swap_back(model: nn.Module) -> None:
    """W's own storage comes back, edited meanwhile through the other tensor (versions follow the data)."""
    w = weights(model)[0]
    other = nn.Parameter(torch.randn_like(w))
    torch.utils.swap_tensors(w, other)
    with torch.no_grad():
        other.mul_(-2.0)
    torch.utils.swap_tensors(w, other)


def _load_state_dict_assign(model: nn.Module) -> None:
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)


def _load_state_dict_swapping(model: nn.Module) -> None:
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()})
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def _data_edit_then_invalidate(model: nn.Module) -> None:
    weights(model)[0].data.mul_(-1.5)  # no version bump (documented), hence:
    WeightStandardization.invalidate_all_caches()


UPDATE_PATHS = {
    "torch.utils.swap_tensors": _swap_tensors,
    "swap-edit-swap-back": _swap_there_edit_and_swap_back,
    "load_state_dict(assign=True)": _load_state_dict_assign,
    "load_state_dict-swap-on-conversion": _load_state_dict_swapping,
    ".data-edit-and-invalidate_all_caches": _data_edit_then_invalidate,
}


@pytest.mark.parametrize("update", list(UPDATE_PATHS.values()), ids=list(UPDATE_PATHS))
def test_other_update_paths_invalidate_the_cache(update):
    model = small_model()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    update(model)
    with torch.no_grad():
        assert not torch.equal(model(x), before)
    assert_fresh(model, x)


# --- point 2: in-place edits of the tensor conv.weight returned ----------------------------------------------------


def _normalize_filters_to_plot(w: torch.Tensor) -> None:
    w.sub_(w.amin(dim=(1, 2, 3), keepdim=True)).div_(w.amax(dim=(1, 2, 3), keepdim=True))


EDITS: dict[str, Callable[[torch.Tensor], object]] = {
    "mul_": lambda w: w.mul_(0.5),
    "zero_": lambda w: w.zero_(),
    "copy_": lambda w: w.copy_(torch.randn_like(w)),
    "normalize-to-plot": _normalize_filters_to_plot,
    "slice-of-one-filter": lambda w: w[1].add_(3.0),
    "setitem-through-a-view": lambda w: w.view(-1).__setitem__(5, 7.0),
    "detach-alias": lambda w: w.detach().neg_(),
    "nn.init": lambda w: nn.init.normal_(w),
}


def _force_parametrize_getter(conv: nn.Module) -> None:
    """A hook on the ParametrizationList: every read goes through parametrize's getter and WS.forward."""
    conv.parametrizations.weight.register_forward_hook(lambda *args: None)


def _no_context() -> AbstractContextManager:
    return ExitStack()


READ_PATHS = {"short-read-path": lambda conv: None, "parametrize-getter": _force_parametrize_getter}
CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("edit", list(EDITS.values()), ids=list(EDITS))
@pytest.mark.parametrize("path", list(READ_PATHS.values()), ids=list(READ_PATHS))
@pytest.mark.parametrize("context", list(CONTEXTS.values()), ids=list(CONTEXTS))
def test_editing_the_returned_weight_does_not_corrupt_later_outputs(edit, path, context):
    model = small_model()
    path(model[0])
    x = torch.randn(2, 3, 8, 8)
    reference = uncached(model)
    with context():
        expected = reference(x)
        assert_close(model(x), expected, rtol=0, atol=0)  # fills the cache
        returned = model[0].weight
        edit(returned)
        assert_close(model(x), expected, rtol=0, atol=0)
        assert_close(model[0].weight, reference[0].weight, rtol=0, atol=0)
        assert_close(model(x), expected, rtol=0, atol=0)  # and the refilled cache is served again


def test_an_edit_through_data_is_not_seen_and_clear_cache_recovers():
    """``.data`` gives a tensor with its own version counter: the documented blind spot, and its remedy."""
    model = small_model()
    x = torch.randn(2, 3, 8, 8)
    reference = uncached(model)
    with torch.no_grad():
        model(x)
        model[0].weight.data.zero_()
        model[0].parametrizations.weight[0].clear_cache()
        assert_close(model(x), reference(x), rtol=0, atol=0)


# --- point 9: inference mode, conv.weight = X ----------------------------------------------------------------------


def test_a_model_built_and_converted_under_inference_mode_runs_inside_and_outside():
    torch.manual_seed(0)
    with torch.inference_mode():
        net = convert_model(torchvision.models.resnet18(num_classes=10), gn=8).eval()
    reference = convert_model(torchvision.models.resnet18(num_classes=10), gn=8).eval()
    reference.load_state_dict(net.state_dict())
    for module in reference.modules():
        if isinstance(module, WeightStandardization):
            module.cache = False
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
    for context in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with context():
            for _ in range(2):
                assert_close(net(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("inside", [True, False], ids=["inside-inference-mode", "outside"])
def test_converting_inference_tensors_in_place_is_refused_and_changes_nothing(inside):
    with torch.inference_mode():
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with torch.inference_mode(inside), pytest.raises(UnsupportedModuleError, match=r"'0.weight' is an inference"):
        convert_model(model, gn=4, inplace=True)
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.BatchNorm2d


def test_an_inference_tensor_weight_is_never_cached_so_its_edits_are_seen():
    """A weight made under inference mode has no version counter: it is never cached (here registered by hand,
    which parametrize allows inside inference mode)."""
    torch.manual_seed(0)
    with torch.inference_mode():
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
        for conv in (model[0], model[2]):
            parametrize.register_parametrization(conv, "weight", WeightStandardization(), unsafe=True)
            short_read.install(conv)
    w = weights(model)[0]
    assert w.is_inference()
    x = torch.randn(2, 3, 8, 8)
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            model(x)
        with torch.inference_mode():
            w.mul_(-0.5).add_(0.25)  # inference tensors have no version counter to see this
        with context():
            expected = nn.functional.conv2d(x, standardize_weight(w), model[0].bias).relu()
            expected = nn.functional.conv2d(expected, standardize_weight(weights(model)[1]), model[2].bias)
            assert_close(model(x), expected, rtol=0, atol=0)


def test_a_model_converted_under_inference_mode_trains_outside_it():
    model = torchvision.models.resnet18(num_classes=10)
    with torch.inference_mode():
        converted = convert_model(model, gn=8)
    assert not any(t.is_inference() for t in [*converted.parameters(), *converted.buffers()])
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    converted(torch.randn(2, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    assert_fresh(converted.eval(), torch.randn(2, 3, 32, 32))


def _plain(w: torch.Tensor) -> torch.Tensor:
    return torch.randn_like(w)


def _parameter(w: torch.Tensor) -> torch.Tensor:
    return nn.Parameter(torch.randn_like(w))


def _channels_last(w: torch.Tensor) -> torch.Tensor:
    return torch.randn_like(w).contiguous(memory_format=torch.channels_last)


def _itself_scaled(w: torch.Tensor) -> torch.Tensor:
    return w.detach() * 3.0 + 1.0


ASSIGNED = {"tensor": _plain, "parameter": _parameter, "channels-last": _channels_last, "from-W": _itself_scaled}


@pytest.mark.parametrize("swap", [False, True], ids=["set_", "swap_tensors"])
@pytest.mark.parametrize("make", list(ASSIGNED.values()), ids=list(ASSIGNED))
def test_assigning_conv_weight_makes_it_the_trained_weight(make, swap):
    model = small_model()
    conv = model[0]
    w = weights(model)[0]
    x = torch.randn(2, 3, 8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        stale = conv.weight.clone()  # fills the cache
    value = make(w)
    expected_w = value.detach().clone()
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        conv.weight = value
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert weights(model)[0] is w  # the same Parameter: the optimizer still holds it
    assert w.is_contiguous()  # X's values were copied into W's own storage and layout
    assert_close(w.detach(), expected_w, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.equal(conv.weight, stale)
        assert_close(conv.weight, standardize_weight(expected_w.contiguous()), rtol=0, atol=0)
    assert_fresh(model, x)
    model(x).square().mean().backward()  # and it trains
    optimizer.step()
    assert not torch.equal(w.detach(), expected_w)
    assert_fresh(model, x)


BAD_ASSIGNMENTS = {
    "wrong-shape": (lambda w: torch.randn(8, 3, 1, 1), r"\(8, 3, 1, 1\).*\(8, 3, 3, 3\)"),
    "transposed-layout": (lambda w: torch.randn(3, 8, 3, 3), r"\(3, 8, 3, 3\).*\(8, 3, 3, 3\)"),
    "flattened": (lambda w: torch.randn(8, 27), r"\(8, 27\).*\(8, 3, 3, 3\)"),
    "float64": (lambda w: torch.randn(8, 3, 3, 3, dtype=torch.float64), r"float64.*\(8, 3, 3, 3\) torch.float32"),
    "meta-device": (lambda w: torch.randn(8, 3, 3, 3, device="meta"), r"on meta.*on cpu"),
    "a-list": (lambda w: w.tolist(), r"cannot assign a list.*\(8, 3, 3, 3\)"),
    "None": (lambda w: None, r"cannot assign a NoneType"),
}


@pytest.mark.parametrize(("make", "message"), list(BAD_ASSIGNMENTS.values()), ids=list(BAD_ASSIGNMENTS))
def test_assigning_an_unfit_weight_raises_a_clear_error_and_changes_nothing(make, message):
    model = small_model()
    x = torch.randn(2, 3, 8, 8)
    w = weights(model)[0]
    kept = w.detach().clone()
    with torch.no_grad():
        model(x)
    with pytest.raises(WSConvertError, match=message):
        model[0].weight = make(w)
    assert_close(w.detach(), kept, rtol=0, atol=0)
    assert w.shape == (8, 3, 3, 3)
    assert_fresh(model, x)


def test_assignment_works_on_a_hand_registered_parametrization():
    """Without wsconvert's property (plain register_parametrization), right_inverse alone: identity onto W."""
    conv = nn.Conv2d(3, 8, 3)
    parametrize.register_parametrization(conv, "weight", WeightStandardization())
    with torch.no_grad():
        stale = conv.weight  # fills the cache
    value = torch.randn(8, 3, 3, 3)
    conv.weight = value
    with torch.no_grad():
        assert_close(conv.weight, standardize_weight(value), rtol=0, atol=0)
        assert not torch.equal(conv.weight, stale)
    with pytest.raises(WSConvertError, match="cannot assign a str"):
        conv.weight = "weights.pt"
