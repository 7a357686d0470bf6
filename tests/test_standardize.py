"""The WS math: both styles against reference formulas and timm, every conv layout, dtypes, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

from wsconvert import InvalidOptionError, WeightStandardization, standardize_weight


def reference_standard(w: torch.Tensor, eps: float) -> torch.Tensor:
    """(W - mean) / sqrt(var_biased + eps) per output channel of a (out, ...) weight, in float64."""
    rows = w.double().reshape(w.shape[0], -1)
    mean = rows.mean(1, keepdim=True)
    var = ((rows - mean) ** 2).mean(1, keepdim=True)
    return ((rows - mean) / torch.sqrt(var + eps)).reshape(w.shape)


def reference_paper(w: torch.Tensor, eps: float) -> torch.Tensor:
    """The authors' reference Conv2d (pytorch-classification models/layers.py): unbiased std + eps."""
    w = w.double()
    mean = w.mean(dim=1, keepdim=True)
    for d in range(2, w.dim()):
        mean = mean.mean(dim=d, keepdim=True)
    centered = w - mean
    std = centered.reshape(w.shape[0], -1).std(dim=1).reshape(-1, *([1] * (w.dim() - 1))) + eps
    return centered / std


REFERENCES = {"standard": reference_standard, "paper": reference_paper}

CONVS = {
    "conv1d": lambda: nn.Conv1d(6, 8, 3),
    "conv2d": lambda: nn.Conv2d(6, 8, 3),
    "conv3d": lambda: nn.Conv3d(4, 6, (2, 3, 3)),
    "grouped": lambda: nn.Conv2d(6, 9, 3, groups=3),
    "depthwise": lambda: nn.Conv2d(6, 6, 3, groups=6),
    "pointwise": lambda: nn.Conv2d(6, 8, 1),
}

TRANSPOSED = {
    "convT1d": lambda: nn.ConvTranspose1d(6, 8, 3),
    "convT2d": lambda: nn.ConvTranspose2d(6, 8, 3),
    "convT3d": lambda: nn.ConvTranspose3d(4, 6, 2),
    "convT2d-grouped": lambda: nn.ConvTranspose2d(6, 9, 3, groups=3),
}


def per_output_channel(conv: nn.Module) -> torch.Tensor:
    """The conv weight as (out_channels, fan_in), for transposed convs too."""
    w = conv.weight.detach()
    if not conv.transposed:
        return w.reshape(w.shape[0], -1)
    g = conv.groups
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1).transpose(1, 2).reshape(conv.out_channels, -1)


@pytest.mark.parametrize("style", ["standard", "paper"])
@pytest.mark.parametrize("make", list(CONVS.values()), ids=list(CONVS))
def test_matches_reference_formula(make, style):
    conv = make()
    got = standardize_weight(conv.weight.detach(), 1e-5, style)
    assert_close(got.double(), REFERENCES[style](conv.weight.detach(), 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["standard", "paper"])
@pytest.mark.parametrize("make", list(TRANSPOSED.values()), ids=list(TRANSPOSED))
def test_transposed_is_standardized_per_output_channel(make, style):
    conv = make()
    ws = WeightStandardization.for_conv(conv, style=style)
    rows = per_output_channel(conv)
    out = conv
    parametrize.register_parametrization(out, "weight", ws)
    got_rows = per_output_channel(out)
    assert got_rows.shape == (conv.out_channels, rows.shape[1])
    assert_close(got_rows.double(), REFERENCES[style](rows, 1e-5), rtol=1e-5, atol=1e-5)
    # and not per input channel: the rows of the raw (in, out/groups, k) layout are not standardized
    raw = out.weight.detach().reshape(out.weight.shape[0], -1)
    assert raw.mean(1).abs().max() > 1e-3


@pytest.mark.parametrize("eps", [1e-5, 1e-8, 1e-3])
def test_standard_equals_timm_stdconv2d(eps):
    timm_conv = StdConv2d(8, 16, 3, padding=1, bias=True, eps=eps)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    conv.load_state_dict(timm_conv.state_dict())
    parametrize.register_parametrization(conv, "weight", WeightStandardization(eps))
    x = torch.randn(2, 8, 10, 10)
    assert_close(conv(x), timm_conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["standard", "paper"])
def test_gradient_matches_reference_formula(style):
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn_like(w)
    (g,) = torch.autograd.grad((standardize_weight(w, 1e-5, style) * grad_out).sum(), w)
    w_ref = w.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((REFERENCES[style](w_ref, 1e-5) * grad_out).sum(), w_ref)
    assert_close(g, g_ref)


@pytest.mark.parametrize("style", ["standard", "paper"])
def test_gradcheck(style):
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: standardize_weight(t, 1e-5, style), (w,))


@pytest.mark.parametrize("style", ["standard", "paper"])
def test_constant_filter_has_finite_output_and_gradient(style):
    w = torch.randn(4, 3, 3, 3)
    w[1] = 0.7  # zero variance
    w.requires_grad_(True)
    out = standardize_weight(w, 1e-5, style)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(w.grad).all()
    assert_close(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("style", ["standard", "paper"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32(style, dtype):
    w = torch.randn(8, 4, 3, 3) * 1e-3  # small weights: fp16 variance would underflow
    got = standardize_weight(w.to(dtype), 1e-8, style)
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    expected = REFERENCES[style](w.to(dtype).float(), 1e-8).to(dtype)
    assert_close(got, expected, rtol=1e-2, atol=1e-2)


def test_channels_last_weight_gives_same_values_and_keeps_its_layout():
    conv = nn.Conv2d(6, 8, 3).to(memory_format=torch.channels_last)
    w = conv.weight.detach()
    assert not w.is_contiguous()
    got = standardize_weight(w)
    assert_close(got, standardize_weight(w.contiguous()))
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_weight_standardization_repr_and_for_conv():
    ws = WeightStandardization.for_conv(nn.ConvTranspose2d(6, 9, 3, groups=3), eps=1e-6, style="paper")
    assert ws.transposed and ws.groups == 3
    assert "paper" in repr(ws) and "1e-06" in repr(ws)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": 0}, "eps=0"),
        ({"eps": -1e-5}, "eps=-1e-05"),
        ({"eps": float("nan")}, "eps=nan"),
        ({"eps": "1e-5"}, "eps='1e-5'"),
        ({"eps": True}, "eps=True"),
        ({"style": "fast"}, "style='fast'"),
        ({"style": None}, "style=None"),
        ({"groups": 0}, "groups=0"),
    ],
)
def test_bad_parametrization_options_are_rejected(kwargs, message):
    with pytest.raises(InvalidOptionError, match=message.replace("(", r"\(")):
        WeightStandardization(**kwargs)


def test_conv_forward_uses_standardized_weight():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    expected = F.conv2d(x, reference_standard(conv.weight.detach(), 1e-5).float(), conv.bias)
    parametrize.register_parametrization(conv, "weight", WeightStandardization())
    assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
