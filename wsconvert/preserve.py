"""Function-preserving conversion (``preserve=True``): Adaptive WS gain/shift on every standardized conv.

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
(``_fill_gain_shift``, a load_state_dict pre-hook next to wsconvert.compat's), so
``convert_model(arch(), preserve=True).load_state_dict(plain)`` reproduces the plain model; a state dict that
carries them keeps them.

GroupNorm affines (with ``gn=G``) are set in wsconvert.calibrate; ``finish`` runs both after the walk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import calibrate
from .fidelity import Fidelity, measure_fidelity
from .options import ConversionOptions
from .report import ConversionReport
from .standardize import WeightStandardization, _filters_as_rows

__all__ = ["filter_gain_shift", "preserve_convs", "finish", "add_preserve_notes", "remove_gain_shift_hook"]

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


def _standardization(conv: nn.Module) -> WeightStandardization | None:
    if not parametrize.is_parametrized(conv, "weight"):
        return None
    chain = conv.parametrizations["weight"]
    ws = chain[0]
    return ws if len(chain) == 1 and isinstance(ws, WeightStandardization) else None


def _fill_gain_shift(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """load_state_dict pre-hook: a conv entry without gain/shift gets them from the weight being loaded
    (ConvAWS2d's rule), so the loaded model computes what a plain conv with that weight computes."""
    ws = _standardization(module)
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


def preserve_convs(steps: Sequence) -> int:
    """Give every conv standardized by ``steps`` gain/shift from its current weight (W_eff == W) and the
    load hook. Returns how many convs got them."""
    count = 0
    for step in steps:
        if step.decision.action != "standardize":
            continue
        conv = step.site.module
        ws = _standardization(conv)
        if ws is None:
            continue
        ws.set_affine(*filter_gain_shift(conv.parametrizations.weight.original, ws))
        if not _has_hook(conv):
            conv.register_load_state_dict_pre_hook(_fill_gain_shift)
        count += 1
    return count


def finish(
    converted: nn.Module,
    steps: Sequence,
    options: ConversionOptions,
    reference: nn.Module | None,
    batches: list[Tensor] | None,
) -> Fidelity | None:
    """After the walk: gain/shift on the convs, GroupNorm affines from the BatchNorms (data-free), then, with
    calibration ``batches``, the layer-by-layer fit and the fidelity measurement against ``reference`` (the
    unconverted model). Returns the fidelity (None without batches)."""
    if not options.preserve:
        return None
    preserve_convs(steps)
    pairs = calibrate.norm_pairs(converted, steps)
    calibrate.set_affines_from_batchnorm(pairs)
    if batches is None or reference is None:
        return None
    fitted = calibrate.fit_affines(reference, converted, pairs, batches)
    methods = {path: ("calibrated" if path in fitted else "data-free") for path, _, _ in pairs}
    return measure_fidelity(reference, converted, batches, methods=methods)


def add_preserve_notes(report: ConversionReport, steps: Sequence, options: ConversionOptions) -> None:
    """Say in the report what preserve=True does to this model."""
    if not options.preserve:
        return
    convs = sum(1 for step in steps if step.decision.action == "standardize")
    report.notes.append(
        f"preserve: {convs} standardized conv(s) get Adaptive WS gain/shift buffers (W_eff = gain * W_hat + shift, "
        "equal to the current weight at conversion; DetectoRS arXiv:2006.02334)"
    )
    replaced = sum(1 for step in steps if step.decision.action == "replace")
    if replaced and options.norm == "bcn":
        report.notes.append(
            f"preserve: the per-group affine of the {replaced} BatchChannelNorm(s) is set data-free from the kept "
            "BatchNorm's running statistics and affine (calibration_data does not refine BatchChannelNorm layers)"
        )
    elif replaced:
        report.notes.append(
            f"preserve: the affine of the {replaced} GroupNorm(s) is set from the replaced BatchNorm's running "
            "statistics and affine (data-free), or fitted layer by layer with calibration_data"
        )
