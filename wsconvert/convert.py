"""The public entry points: plan_conversion, convert_model and bake (thin over wsconvert.plan)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .norms.bcn import bake_batch_channel_norms
from .options import ConversionOptions
from .plan import check_model, copy_model, plan_for
from .preserve.fidelity import Fidelity
from .report import ConversionReport
from .rules import Rule
from .ws.bake import bake_conv
from .ws.recompute import recompute_in_backward

__all__ = ["plan_conversion", "convert_model", "bake"]


def plan_conversion(
    model: nn.Module,
    *,
    gn: int | None = None,
    eps: float = 1e-5,
    style: str = "standard",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    skip_depthwise: bool = False,
    inplace: bool = False,
    skip_unnormalized: bool = False,
    example_inputs: object = None,
    input_shape: Sequence[int] | None = None,
    norm: str | None = None,
    bcn_estimate: float | None = None,
    preserve: bool = False,
    standardize_frozen: bool = False,
    calibration_steps: int | None = None,
    calibration_data: object = None,
    rules: Sequence[Rule] | None = None,
) -> ConversionReport:
    """What ``convert_model`` with these options would do, without touching ``model``.

    ``inplace`` is accepted so the same keyword arguments can be passed to both functions. The report
    also lists the convs whose output feeds no normalization layer (``report.unnormalized``, found by
    ``wsconvert.probes.unnormalized``): by torch.fx tracing, or, when the model cannot be traced, by one forward pass
    on ``example_inputs`` (a tuple of positional arguments, or one argument such as a Tensor), run in
    eval mode without gradients. ``input_shape=(1, 3, 224, 224)`` is shorthand for a random normal
    ``example_inputs`` of that shape on the model's device and dtype. With an input, norm layers that
    see one value per channel (after global pooling) become ``GroupNorm(1, C)`` (see wsconvert.probes.pooled).
    ``rules`` (``wsconvert.rules.Rule`` entries) are consulted before the built-in table.
    This is ``wsconvert.make_plan(...).report``; with ``preserve=True`` and ``calibration_data`` the plan is
    also applied to a copy, whose measured agreement is the report's ``fidelity``.
    """
    options = ConversionOptions.from_arguments(locals())
    plan = plan_for(model, options, example_inputs, input_shape, calibration_data, rules, report_probe=True)
    if calibration_data is None:
        return plan.report
    plan.apply(model)  # measured on a converted copy: the model stays untouched
    return plan.build_report(plan.fidelity)


def convert_model(
    model: nn.Module,
    *,
    gn: int | None = None,
    eps: float = 1e-5,
    style: str = "standard",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    skip_depthwise: bool = False,
    inplace: bool = False,
    skip_unnormalized: bool = False,
    example_inputs: object = None,
    input_shape: Sequence[int] | None = None,
    norm: str | None = None,
    bcn_estimate: float | None = None,
    preserve: bool = False,
    standardize_frozen: bool = False,
    calibration_steps: int | None = None,
    calibration_data: object = None,
    rules: Sequence[Rule] | None = None,
) -> nn.Module:
    """Put Weight Standardization on every conv weight and, with ``gn=G``, swap BatchNorm for GroupNorm.

    Convs keep their class and their weight Parameter (now at ``parametrizations.weight.original``);
    see ``plan_conversion`` for what is converted and skipped. With ``inplace=False`` the model is
    deep-copied first and left untouched. Returns the converted model (a new module only when the
    model itself is a BatchNorm layer). ``wsconvert.make_plan(...).apply(model, inplace=...)``.

    With ``skip_unnormalized=True``, convs whose output feeds no normalization layer keep a plain weight
    (see ``plan_conversion`` for how they are found and for ``example_inputs`` / ``input_shape``). With an
    input, norm layers that see one value per channel (after global pooling) become ``GroupNorm(1, C)``.
    """
    options = ConversionOptions.from_arguments(locals())
    return _convert(model, options, inplace, example_inputs, input_shape, calibration_data, rules)[0]


def convert_measured(
    model: nn.Module,
    *,
    inplace: bool = False,
    example_inputs: object = None,
    input_shape: Sequence[int] | None = None,
    calibration_data: object = None,
    rules: Sequence[Rule] | None = None,
    **options: object,
) -> tuple[nn.Module, Fidelity | None]:
    """``convert_model`` with the same keyword arguments, also returning ``report.fidelity``'s value: the
    agreement measured on ``calibration_data`` (None without it). The CLI's entry point."""
    built = ConversionOptions.build(**options)
    return _convert(model, built, inplace, example_inputs, input_shape, calibration_data, rules)


def _convert(
    model: nn.Module,
    options: ConversionOptions,
    inplace: bool,
    example_inputs: object,
    input_shape: Sequence[int] | None,
    calibration_data: object,
    rules: Sequence[Rule] | None,
) -> tuple[nn.Module, Fidelity | None]:
    """Plan (probing only what the decisions need), apply; the model and the fidelity measured on the calibration
    data (None without it)."""
    # Plan.apply leaves torch.inference_mode itself (the tensors it makes must be trainable).
    plan = plan_for(model, options, example_inputs, input_shape, calibration_data, rules, report_probe=False)
    converted = plan.apply(model, inplace=inplace)
    return converted, plan.fidelity


def bake(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every WS parametrization by its current standardized weight, as a plain Parameter.

    The result computes the same outputs (bitwise, in eval), has plain module classes, pickles with
    ``torch.save(model)``, scripts and exports. It no longer standardizes: bake for inference and export,
    not to keep training. With ``inplace=False`` the model is deep-copied first.
    """
    target = check_model(model) if inplace else copy_model(check_model(model))
    recompute_in_backward(target, enabled=False)  # its hooks only serve the parametrization removed here
    for module in target.modules():
        bake_conv(module)
    return bake_batch_channel_norms(target)
