"""Numerics of the fast "standard" path (one F.layer_norm over the trailing dims) for every weight layout.

standardize_weight takes that path for plain conv weights that are contiguous or channels_last(_3d) and the
row-view path otherwise (transposed convs, strided views, "paper" style). Both must agree with the reference
formula (biased variance, eps inside the sqrt; timm StdConv2d) within 1e-5, in value and in gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from wsconvert import WeightStandardization, standardize_weight
from wsconvert.ws.standardize import _standard_compiled, _standard_direct


def reference(w: torch.Tensor, eps: float) -> torch.Tensor:
    """(W - mean) / sqrt(var_biased + eps) per output channel, in float64, same shape as w."""
    rows = w.double().reshape(w.shape[0], -1)
    mean = rows.mean(1, keepdim=True)
    var = ((rows - mean) ** 2).mean(1, keepdim=True)
    return ((rows - mean) / torch.sqrt(var + eps)).reshape(w.shape)


def _contiguous(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape)


def _channels_last(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape).contiguous(memory_format=torch.channels_last)


def _channels_last_3d(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)


def _strided_slice(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape[0] * 2, *shape[1:])[::2]  # not dense: takes the row-view fallback


def _permuted_odd(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape[0], *reversed(shape[1:])).transpose(1, -1)  # dense but neither layout


LAYOUTS = {
    "contiguous-4d": (_contiguous, (8, 6, 3, 3), True),
    "channels-last-4d": (_channels_last, (8, 6, 3, 3), True),
    "channels-last-1x1": (_channels_last, (8, 6, 1, 1), True),
    "depthwise-channels-last": (_channels_last, (6, 1, 3, 3), True),
    "contiguous-3d-conv1d": (_contiguous, (8, 6, 5), True),
    "contiguous-5d": (_contiguous, (4, 3, 2, 3, 3), True),
    "channels-last-5d": (_channels_last_3d, (4, 3, 2, 3, 3), True),
    "strided-slice": (_strided_slice, (8, 6, 3, 3), False),
    "permuted": (_permuted_odd, (8, 6, 3, 2), False),
}


@pytest.mark.parametrize(("make", "shape", "fast"), list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_value_and_layout_match_the_reference(make, shape, fast):
    w = make(shape)
    assert (_standard_direct(w, 1e-5) is not None) == fast
    got = standardize_weight(w, 1e-5)
    assert got.shape == w.shape
    assert_close(got.double(), reference(w, 1e-5), rtol=1e-5, atol=1e-5)
    if fast:
        assert got.stride() == w.stride() or got.is_contiguous(), "the result keeps the weight's layout"


@pytest.mark.parametrize(("make", "shape", "fast"), list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_gradient_matches_the_reference(make, shape, fast):
    w = make(shape).requires_grad_(True)
    grad_out = torch.randn(shape)
    (got,) = torch.autograd.grad((standardize_weight(w, 1e-5) * grad_out).sum(), w)
    w_ref = w.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad((reference(w_ref, 1e-5) * grad_out.double()).sum(), w_ref)
    assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [_contiguous, _channels_last], ids=["contiguous", "channels-last"])
def test_gradcheck_float64(make):
    w = make((3, 2, 2, 2)).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: standardize_weight(t, 1e-5), (w,))
    assert torch.autograd.gradgradcheck(lambda t: standardize_weight(t, 1e-5), (w,))


@pytest.mark.parametrize("make", [_contiguous, _channels_last], ids=["contiguous", "channels-last"])
def test_zero_variance_filters_give_finite_values_and_gradients(make):
    w = make((4, 3, 3, 3))
    with torch.no_grad():
        w[1] = 0.25
        w[3] = 0.0
    w.requires_grad_(True)
    out = standardize_weight(w, 1e-5)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(w.grad).all()
    assert_close(out[1], torch.zeros_like(out[1]))
    assert_close(out[3], torch.zeros_like(out[3]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make", [_contiguous, _channels_last], ids=["contiguous", "channels-last"])
def test_low_precision_keeps_dtype_and_layout_and_uses_float32_statistics(make, dtype):
    w = (make((8, 4, 3, 3)) * 1e-3).to(dtype)  # tiny weights: fp16 statistics would underflow with eps=1e-8
    got = standardize_weight(w, 1e-8)
    assert got.dtype == dtype
    assert got.stride() == w.stride()
    expected = reference(w.float(), 1e-8)
    assert_close(got.double(), expected, rtol=1e-2, atol=1e-2)
    w.requires_grad_(True)
    standardize_weight(w, 1e-8).float().square().sum().backward()
    assert w.grad.dtype == dtype and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_is_standardized_per_output_channel(groups):
    conv = torch.nn.ConvTranspose2d(4, 6, 3, groups=groups)
    w = conv.weight.detach().requires_grad_(True)
    got = standardize_weight(w, 1e-5, transposed=True, groups=groups)

    # (in, out/groups, k, k) -> (out, in/groups * k * k) rows
    def rows(t: torch.Tensor) -> torch.Tensor:
        g = groups
        return t.reshape(g, t.shape[0] // g, t.shape[1], -1).transpose(1, 2).reshape(conv.out_channels, -1)

    assert_close(rows(got).double(), reference(rows(w.detach()), 1e-5), rtol=1e-5, atol=1e-5)


def test_parametrization_training_path_has_one_autograd_node_for_contiguous_weights():
    """The fast path records a single layer_norm node: no view/permute/copy nodes around it."""
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    out = WeightStandardization()(w)
    assert out.grad_fn is not None and "LayerNorm" in type(out.grad_fn).__name__
    assert out.grad_fn.next_functions[0][0] is not None
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "AccumulateGrad"


# ---- the formula traced under torch.compile (var_mean + rsqrt, fused by inductor) ----


@pytest.mark.parametrize(("make", "shape", "fast"), list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_compiled_formula_matches_the_reference_in_value_and_gradient(make, shape, fast):
    w = make(shape).requires_grad_(True)
    grad_out = torch.randn(shape)
    got = _standard_compiled(w, 1e-5)
    assert_close(got.double(), reference(w.detach(), 1e-5), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad((got * grad_out).sum(), w)
    w_ref = w.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad((reference(w_ref, 1e-5) * grad_out.double()).sum(), w_ref)
    assert_close(grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_compiled_formula_gradcheck_zero_variance_and_low_precision():
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _standard_compiled(t, 1e-5), (w,))
    flat = torch.randn(4, 3, 3, 3)
    with torch.no_grad():
        flat[2] = -0.5
    flat.requires_grad_(True)
    out = _standard_compiled(flat, 1e-5)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(flat.grad).all()
    small = (torch.randn(8, 4, 3, 3) * 1e-3).to(torch.float16)
    half = _standard_compiled(small, 1e-8)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert_close(half.double(), reference(small.float(), 1e-8), rtol=1e-2, atol=1e-2)


def test_standardize_weight_uses_the_compiled_formula_while_compiling(monkeypatch):
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    eager = standardize_weight(w, 1e-5)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = standardize_weight(w, 1e-5)
    assert "LayerNorm" not in type(traced.grad_fn).__name__  # the var_mean formula, not layer_norm
    assert_close(traced, eager, rtol=1e-5, atol=1e-5)
    # transposed weights and the "paper" style keep their own paths
    paper = standardize_weight(w, 1e-5, "paper")
    monkeypatch.undo()
    assert_close(paper, standardize_weight(w, 1e-5, "paper"), rtol=0, atol=0)
