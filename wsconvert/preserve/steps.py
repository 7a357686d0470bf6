"""Function-preserving conversion (``preserve=True``), run after the walk.

Every standardized conv gets Adaptive WS gain/shift (wsconvert.ws.adaptive: W_eff = gain * W_hat + shift,
equal to the trained W at conversion; DetectoRS, Qiao et al. 2020, arXiv:2006.02334); every GroupNorm that
replaced a BatchNorm gets its affine from that BatchNorm's statistics or from calibration data
(wsconvert.preserve.calibrate); with calibration data the agreement is measured (wsconvert.preserve.fidelity).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..norms.bcn import preserve_batch_channel_norms
from ..options import ConversionOptions
from ..ws.adaptive import install_gain_shift
from . import calibrate
from .fidelity import Fidelity, measure_fidelity

__all__ = ["preserve_convs", "finish", "preserved_tensors", "preserve_notes"]


def preserve_convs(steps: Sequence) -> int:
    """Give every conv standardized by ``steps`` gain/shift from its current weight (W_eff == W) and the
    load hook. Returns how many convs got them."""
    return sum(1 for step in steps if step.decision.action == "standardize" and install_gain_shift(step.site.module))


def preserved_tensors(steps: Sequence, options: ConversionOptions) -> list[Tensor]:
    """The existing tensors ``finish`` may write: those of every replaced module (a GroupNorm inherits its
    BatchNorm's weight/bias Parameter objects and gets new values copied in). New modules and buffers (a
    BatchChannelNorm's group affine, gain/shift) are dropped by the walk's undo anyway. A Transaction keeps
    these values (``wsconvert.walk.Transaction.keep_values``), so a failing preserve step can be undone."""
    if not options.preserve:
        return []
    seen: dict[int, Tensor] = {}
    for step in steps:
        if step.decision.action == "replace":
            for tensor in [*step.site.module.parameters(), *step.site.module.buffers()]:
                seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def finish(
    converted: nn.Module,
    steps: Sequence,
    options: ConversionOptions,
    reference: nn.Module | None,
    batches: list[Tensor] | None,
) -> Fidelity | None:
    """After the walk: data-free BatchChannelNorm affines (wsconvert.norms.bcn), gain/shift on the convs,
    GroupNorm affines from the BatchNorms (data-free), then, with calibration ``batches``, the layer-by-layer fit,
    the end-to-end distillation of the GroupNorm affines, and the fidelity measurement against ``reference`` (the
    unconverted model). Returns the fidelity (None without batches). What it writes in existing tensors is
    ``preserved_tensors(steps, options)``."""
    if not options.preserve:
        return None
    preserve_batch_channel_norms(converted, steps)
    preserve_convs(steps)
    pairs = calibrate.norm_pairs(converted, steps)
    calibrate.set_affines_from_batchnorm(pairs)
    if batches is None or reference is None:
        return None
    fitted = calibrate.fit_affines(reference, converted, pairs, batches)
    fitted |= calibrate.distill_affines(reference, converted, pairs, batches, steps=options.calibration_steps)
    methods = {path: ("calibrated" if path in fitted else "data-free") for path, _, _ in pairs}
    return measure_fidelity(reference, converted, batches, methods=methods)


def preserve_notes(steps: Sequence, options: ConversionOptions) -> list[str]:
    """What the report says preserve=True does to this model (none without preserve)."""
    if not options.preserve:
        return []
    convs = sum(1 for step in steps if step.decision.action == "standardize")
    notes = [
        f"preserve: {convs} standardized conv(s) get Adaptive WS gain/shift buffers (W_eff = gain * W_hat + shift, "
        "equal to the current weight at conversion; DetectoRS arXiv:2006.02334)"
    ]
    replaced = sum(1 for step in steps if step.decision.action == "replace")
    if replaced and options.norm == "bcn":
        notes.append(
            f"preserve: the per-group affine of the {replaced} BatchChannelNorm(s) is set data-free from the kept "
            "BatchNorm's running statistics and affine (calibration_data does not refine BatchChannelNorm layers)"
        )
    elif replaced:
        notes.append(
            f"preserve: the affine of the {replaced} GroupNorm(s) is set from the replaced BatchNorm's running "
            "statistics and affine (data-free), or with calibration_data fitted layer by layer, then distilled "
            "end to end"
        )
    return notes
