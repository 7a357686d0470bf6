"""The public entry points: plan_conversion, convert_model and bake."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import InvalidOptionError, UnsupportedModuleError, WSConvertError
from .integrations.wrappers import check_unwrapped
from .norms.bcn import bake_batch_channel_norms, preserve_batch_channel_norms
from .options import ConversionOptions
from .preserve.calibrate import calibration_batches, eval_mode, run_model
from .preserve.fidelity import Fidelity
from .preserve.steps import add_preserve_notes, finish
from .probes.pooled import one_group_for_pooled_norms, pooled_norm_sizes
from .probes.unnormalized import (
    ProbeResult,
    add_probe_to_report,
    probe_unnormalized,
    resolve_example_inputs,
    skip_unnormalized_steps,
)
from .report import ConversionReport
from .walk import Step, apply, build_report, plan
from .ws.bake import bake_conv, own_parametrized_class
from .ws.recompute import recompute_in_backward

__all__ = ["plan_conversion", "convert_model", "bake"]


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    _check_eager(model)
    check_unwrapped(model)  # convert first, then wrap (DDP, FSDP, torch.compile, Opacus)
    return model


def _check_eager(model: nn.Module) -> None:
    """Refuse TorchScript modules: their code is compiled, parametrizations and swapped modules are ignored."""
    for path, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            where = f"module {path!r}" if path else "the model"
            raise UnsupportedModuleError(
                f"{where} is a TorchScript module ({type(module).__name__}, from torch.jit.script or "
                "torch.jit.trace): its compiled code would not see a conversion. Convert the eager model, "
                "bake it (wsconvert.bake), then script or trace the result"
            )


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parametrized modules own their classes (``wsconvert.ws.bake.own_parametrized_class``):
    registering WS on a conv that already carries a parametrization (on its bias, say) adds a property there."""
    try:
        copied = copy.deepcopy(model)
    except Exception as error:  # deepcopy runs arbitrary user __deepcopy__/__reduce__ code
        raise WSConvertError(
            f"cannot deep-copy the {type(model).__name__} to convert a copy ({type(error).__name__}: {error}); "
            "pass inplace=True to convert the model itself"
        ) from error
    for module in copied.modules():
        if parametrize.is_parametrized(module):
            own_parametrized_class(module)
    return copied


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
    calibration_data: object = None,
) -> ConversionReport:
    """What ``convert_model`` with these options would do, without touching ``model``.

    ``inplace`` is accepted so the same keyword arguments can be passed to both functions. The report
    also lists the convs whose output feeds no normalization layer (``report.unnormalized``, found by
    ``wsconvert.probes.unnormalized``): by torch.fx tracing, or, when the model cannot be traced, by one forward pass
    on ``example_inputs`` (a tuple of positional arguments, or one argument such as a Tensor), run in
    eval mode without gradients. ``input_shape=(1, 3, 224, 224)`` is shorthand for a random normal
    ``example_inputs`` of that shape on the model's device and dtype. With an input, norm layers that
    see one value per channel (after global pooling) become ``GroupNorm(1, C)`` (see wsconvert.probes.pooled).
    """
    options = ConversionOptions.build(
        gn=gn,
        eps=eps,
        style=style,
        include=include,
        exclude=exclude,
        skip_depthwise=skip_depthwise,
        skip_unnormalized=skip_unnormalized,
        norm=norm,
        bcn_estimate=bcn_estimate,
        preserve=preserve,
    )
    model = _check_model(model)
    calibration_batches(calibration_data, preserve=options.preserve)  # validate before any work
    example = resolve_example_inputs(model, example_inputs, input_shape)
    probe = probe_unnormalized(model, example)
    steps = _planned(model, options, example, probe)
    report = add_probe_to_report(build_report(steps, options), steps, probe, options)
    add_preserve_notes(report, steps, options)
    if calibration_data is not None:  # measured on a converted copy: the model stays untouched
        report.fidelity = _convert(model, options, False, example_inputs, input_shape, calibration_data)[1]
    return report


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
    calibration_data: object = None,
) -> nn.Module:
    """Put Weight Standardization on every conv weight and, with ``gn=G``, swap BatchNorm for GroupNorm.

    Convs keep their class and their weight Parameter (now at ``parametrizations.weight.original``);
    see ``plan_conversion`` for what is converted and skipped. With ``inplace=False`` the model is
    deep-copied first and left untouched. Returns the converted model (a new module only when the
    model itself is a BatchNorm layer).

    With ``skip_unnormalized=True``, convs whose output feeds no normalization layer keep a plain weight
    (see ``plan_conversion`` for how they are found and for ``example_inputs`` / ``input_shape``). With an
    input, norm layers that see one value per channel (after global pooling) become ``GroupNorm(1, C)``.
    """
    options = ConversionOptions.build(
        gn=gn,
        eps=eps,
        style=style,
        include=include,
        exclude=exclude,
        skip_depthwise=skip_depthwise,
        skip_unnormalized=skip_unnormalized,
        norm=norm,
        bcn_estimate=bcn_estimate,
        preserve=preserve,
    )
    return _convert(model, options, inplace, example_inputs, input_shape, calibration_data)[0]


def convert_measured(
    model: nn.Module,
    *,
    inplace: bool = False,
    example_inputs: object = None,
    input_shape: Sequence[int] | None = None,
    calibration_data: object = None,
    **options: object,
) -> tuple[nn.Module, Fidelity | None]:
    """``convert_model`` with the same keyword arguments, also returning ``report.fidelity``'s value: the
    agreement measured on ``calibration_data`` (None without it). The CLI's entry point."""
    built = ConversionOptions.build(**options)
    return _convert(model, built, inplace, example_inputs, input_shape, calibration_data)


def _convert(
    model: nn.Module,
    options: ConversionOptions,
    inplace: bool,
    example_inputs: object,
    input_shape: Sequence[int] | None,
    calibration_data: object,
) -> tuple[nn.Module, Fidelity | None]:
    """convert_model's work, also returning the fidelity measured on the calibration data (preserve.finish)."""
    if torch.is_inference_mode_enabled():
        # The tensors a conversion makes (the deep copy, new GroupNorm parameters) would be inference tensors
        # there, which can never be trained: convert outside inference mode.
        with torch.inference_mode(False):
            return _convert(model, options, inplace, example_inputs, input_shape, calibration_data)
    plan(_check_model(model), options)  # raises on unconvertible modules before anything is copied
    if inplace:
        _refuse_inference_tensors(model)
    batches = calibration_batches(calibration_data, preserve=options.preserve)
    example = resolve_example_inputs(model, example_inputs, input_shape)
    probe = probe_unnormalized(model, example) if options.skip_unnormalized else None
    reference = None
    if batches is not None:  # the unconverted model, to fit and measure against
        if inplace:
            with eval_mode(model):
                run_model(model, batches[0], 0, what="original")  # fails before anything is changed
        reference = _copy(model) if inplace else model
    target = model if inplace else _copy(model)
    steps = _planned(target, options, example, probe)
    converted = apply(target, steps, options)
    if options.preserve:
        preserve_batch_channel_norms(converted, steps)  # data-free group affines (wsconvert.norms.bcn)
    return converted, finish(converted, steps, options, reference, batches)


def _refuse_inference_tensors(model: nn.Module) -> None:
    """In-place conversion rewrites the model's own tensors (parametrize ``set_``s each conv weight), which torch
    forbids for inference tensors outside inference mode; a copy gets normal tensors."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_inference():
            raise UnsupportedModuleError(
                f"{name!r} is an inference tensor (the model was built or loaded under torch.inference_mode), so "
                "the model cannot be converted in place; convert a copy (inplace=False, the default: the copy gets "
                "normal tensors, which can also be trained), or build the model outside inference mode"
            )


def _planned(model: nn.Module, options: ConversionOptions, example: object, probe: ProbeResult | None) -> list[Step]:
    """The plan for ``model``, adjusted by the probes: unnormalized convs skipped (with skip_unnormalized),
    norm layers that see one value per channel given one group (with an example input)."""
    steps = skip_unnormalized_steps(plan(model, options), probe, options)
    return one_group_for_pooled_norms(steps, pooled_norm_sizes(model, example, options.gn))


def bake(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every WS parametrization by its current standardized weight, as a plain Parameter.

    The result computes the same outputs (bitwise, in eval), has plain module classes, pickles with
    ``torch.save(model)``, scripts and exports. It no longer standardizes: bake for inference and export,
    not to keep training. With ``inplace=False`` the model is deep-copied first.
    """
    target = _check_model(model) if inplace else _copy(_check_model(model))
    recompute_in_backward(target, enabled=False)  # its hooks only serve the parametrization removed here
    for module in target.modules():
        bake_conv(module)
    return bake_batch_channel_norms(target)
