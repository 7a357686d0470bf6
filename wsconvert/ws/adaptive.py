"""Adaptive Weight Standardization: the per-filter gain/shift that makes a standardized conv compute its trained weight.

Weight Standardization replaces a trained filter W0 by W_hat = (W0 - mean) / sigma, which changes what the
model computes. Adaptive Weight Standardization (DetectoRS, Qiao et al. 2020, arXiv:2006.02334; mmcv
``mmcv/cnn/bricks/conv_ws.py`` ``ConvAWS2d``) applies a per-output-filter affine after the standardization,
W_eff = gain * W_hat + shift, with buffers gain = sigma(W0) and shift = mean(W0) taken from the weights at
conversion, so that W_eff == W0 there: the converted model computes what the original did (within fp32
rounding), and training still updates W through the standardization. sigma is the style's own denominator
("standard": sqrt(var_biased + eps); "paper": std_unbiased + eps), so the identity holds for both styles.
The shift cannot be folded into a bias or a following norm: mean(W) * sum(receptive field) depends on the
input.

The buffers live on the conv's WeightStandardization module (``<conv>.parametrizations.weight.0.gain`` /
``.shift``, shape (out_channels,); ConvTranspose per output channel too). Like ConvAWS2d, loading a state dict
that carries no gain/shift for a conv (a plain, unconverted checkpoint) sets them from the weight being loaded
(``_fill_gain_shift``, a load_state_dict pre-hook next to wsconvert.ws.compat's), so
``convert_model(arch(), preserve=True).load_state_dict(plain)`` reproduces the plain model; a state dict that
carries them keeps them.

``preserve=True`` (wsconvert.preserve.steps) installs them on every standardized conv; GroupNorm affines are set
in wsconvert.preserve.calibrate.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .detect import standardization
from .standardize import WeightStandardization, _filters_as_rows

__all__ = ["filter_gain_shift", "install_gain_shift", "remove_gain_shift_hook"]

_PREFIX = "parametrizations.weight."
_GAIN, _SHIFT = _PREFIX + "0.gain", _PREFIX + "0.shift"


def filter_gain_shift(weight: Tensor, ws: WeightStandardization) -> tuple[Tensor, Tensor]:
    """(gain, shift), shape (out_channels,), such that ``gain * W_hat + shift == weight`` per output filter.

    gain is the denominator of ``ws``'s style (standard: sqrt(var_biased + eps), paper: std_unbiased + eps)
    and shift the filter mean; computed in float32 for half/bfloat16 weights and stored in the weight's dtype.
    """
    with torch.no_grad():
        rows, _ = _filters_as_rows(weight.detach(), ws.transposed, ws.groups)
        rows = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows
        if ws.style == "paper":
            var, mean = torch.var_mean(rows, dim=1, correction=1)
            gain = var.clamp_min(0).sqrt() + ws.eps
        else:
            var, mean = torch.var_mean(rows, dim=1, correction=0)
            gain = (var + ws.eps).sqrt()
        return gain.to(weight.dtype), mean.to(weight.dtype)


def _fill_gain_shift(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """load_state_dict pre-hook: a conv entry without gain/shift gets them from the weight being loaded
    (ConvAWS2d's rule), so the loaded model computes what a plain conv with that weight computes."""
    ws = standardization(module, alone=True)
    if ws is None or ws._buffers.get("gain") is None:
        return
    gain_key, shift_key = prefix + _GAIN, prefix + _SHIFT
    if gain_key in state_dict or shift_key in state_dict:
        return  # carried by the state dict (a missing half is reported by strict loading)
    weight = state_dict.get(prefix + "weight", state_dict.get(prefix + _PREFIX + "original"))
    if not isinstance(weight, Tensor) or weight.shape != module.parametrizations.weight.original.shape:
        return  # absent (strict=False partial load) or a size mismatch that load_state_dict reports itself
    state_dict[gain_key], state_dict[shift_key] = filter_gain_shift(weight, ws)


def _has_hook(module: nn.Module) -> bool:
    return any(getattr(h, "hook", h) is _fill_gain_shift for h in module._load_state_dict_pre_hooks.values())


def remove_gain_shift_hook(module: nn.Module) -> None:
    """Remove ``_fill_gain_shift`` from a conv (bake: its weight is plain again)."""
    hooks = module._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is _fill_gain_shift]:
        del hooks[key]


def install_gain_shift(conv: nn.Module) -> bool:
    """Give a conv standardized by one WeightStandardization gain/shift from its current weight (W_eff == W)
    and the load hook that fills them from a plain checkpoint. False when ``conv`` is not such a conv."""
    ws = standardization(conv, alone=True)
    if ws is None:
        return False
    ws.set_affine(*filter_gain_shift(conv.parametrizations.weight.original, ws))
    if not _has_hook(conv):
        conv.register_load_state_dict_pre_hook(_fill_gain_shift)
    return True
