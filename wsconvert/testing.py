"""``check_conversion``: the model-zoo sweep's invariants (scripts/zoo_sweep.py), for a user's own test suite.

After ``converted = convert_model(original, ...)`` it checks what wsconvert promises (README "no silently
dropped activation, no double standardization, a report of everything it did and skipped"):

- no BatchNorm-family layer is left when ``gn`` was set (BatchNorm parts of a BatchChannelNorm and layers
  the report's include/exclude leave out are fine);
- every activation module runs as often as before (forward-hook call counts per module path, eval mode,
  the check the sweep added after other converters dropped timm BatchNormAct2d activations);
- nothing is standardized twice (one WeightStandardization per tensor,
  none on a conv type that standardizes itself: timm's StdConv2d family,
  transformers BiT, mmcv ConvWS2d, ...);
- with ``report``: every conv and BatchNorm-family layer is listed (converted or skipped) and the convs
  that gained a WeightStandardization are exactly the ones reported as standardized;
- outputs (eval and training mode) and gradients are finite, and backward reaches some parameter.

Both models are left as they were: train/eval flags, buffers (BatchNorm statistics), ``.grad`` and the
global RNG state are restored. This module needs torch but not the checkpoint stack (docs/api.md).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten

from . import rules
from ._optional import loaded_types
from .errors import InvalidOptionError, WSConvertError
from .norms.bcn import BatchChannelNorm
from .report import ConversionReport
from .rules.builtin import is_frozen_batchnorm_like
from .ws.standardize import WeightStandardization

__all__ = ["ConversionCheck", "ConversionCheckError", "Violation", "activation_calls", "check_conversion"]

T = TypeVar("T")

# Paths listed in one message line before "... and N more" (every path is in the violation's details).
_SHOWN = 5
_DETAILS = 20  # detail lines shown by str()

# Modules counted as activations: torch's, timm's (timm.layers.activations, _me, _jit) and those of the
# third-party libraries the sweep covers (transformers, MONAI, pytorchvideo).
_ACTIVATION_MODULES = (
    "torch.nn.modules.activation",
    "timm.layers.activations",
    "transformers.activations",
    "monai.networks.blocks.activation",
    "pytorchvideo.layers.swish",
)


@dataclass(frozen=True)
class Violation:
    """One broken invariant: ``check`` names it, ``message`` is one line, ``details`` name every module path."""

    check: str  # "batchnorm_left", "activations", "standardized_twice", "report", "finite", "backward", "error"
    message: str
    details: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"    {line}" for line in self.details[:_DETAILS]]
        if len(self.details) > _DETAILS:
            lines.append(f"    ... and {len(self.details) - _DETAILS} more (Violation.details lists them all)")
        return "\n".join([self.message, *lines])


@dataclass
class ConversionCheck:
    """What ``check_conversion`` measured; ``ok`` when ``violations`` is empty."""

    violations: list[Violation] = field(default_factory=list)
    convs: int = 0  # distinct conv modules of the original
    batchnorms: int = 0  # distinct BatchNorm-family modules of the original
    standardized: int = 0  # modules that carry a WeightStandardization after conversion but did not before
    activations_before: int = 0  # activation module calls in one eval forward of the original
    activations_after: int = 0  # ... and of the converted model

    @property
    def ok(self) -> bool:
        return not self.violations

    def __str__(self) -> str:
        if self.ok:
            return (
                f"check_conversion: ok ({self.convs} conv(s), {self.standardized} newly standardized, "
                f"{self.batchnorms} BatchNorm-family layer(s), {self.activations_before} activation call(s))"
            )
        lines = [f"check_conversion: {len(self.violations)} invariant(s) violated:"]
        lines += [f"- {violation}".replace("\n", "\n  ") for violation in self.violations]
        return "\n".join(lines)


class ConversionCheckError(WSConvertError, AssertionError):
    """A converted model breaks an invariant of ``check_conversion``; ``result`` holds every violation.

    An AssertionError, so a failing check reads as a failed assertion in pytest (and ``pytest.raises
    (AssertionError)`` catches it), and a WSConvertError like every error wsconvert raises on purpose.
    """

    def __init__(self, result: ConversionCheck) -> None:
        super().__init__(str(result))
        self.result = result


def _as_args(inputs: object) -> tuple:
    """A tuple is the positional arguments; anything else (a Tensor, a list of images) is the one argument."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _shown(paths: Sequence[str]) -> str:
    names = [p or "<model>" for p in paths[:_SHOWN]]
    more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return ", ".join(names) + more


def _type(module: nn.Module) -> str:
    return parametrize.type_before_parametrizations(module).__name__


def _batchnorm_types() -> tuple[type, ...]:
    """BatchNorm-family types a ``gn`` conversion removes (optional packages only when already imported)."""
    return (
        _BatchNorm,
        *loaded_types("torchvision.ops.misc", "FrozenBatchNorm2d"),
        *loaded_types("timm.layers.norm_act", "FrozenBatchNorm2d", "FrozenBatchNormAct2d"),
    )


def _is_batchnorm_family(module: nn.Module) -> bool:
    """A BatchNorm-family layer: the types above, or a DETR-family frozen BatchNorm (transformers'
    ``*FrozenBatchNorm2d`` classes, recognized by their buffers: wsconvert.rules.builtin)."""
    return isinstance(module, _batchnorm_types()) or is_frozen_batchnorm_like(module)


def _standardizes_itself(module: nn.Module) -> bool:
    """True for a conv type that standardizes its own weight (timm StdConv2d, transformers BiT, mmcv ConvWS2d,
    ...): a rule marked ``standardized`` matches it (wsconvert.rules.builtin, or a registered rule)."""
    return any(rule.standardized and rule.matches(module) for rule in rules.resolve())


def _is_activation(module: nn.Module) -> bool:
    cls = parametrize.type_before_parametrizations(module)
    return cls.__module__.startswith(_ACTIVATION_MODULES) and not isinstance(module, nn.MultiheadAttention)


def _all_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every path of every distinct module, by ``id`` (the first path first, as ``named_modules`` orders them)."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    return paths


def _float_tensors(tree: object) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _non_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when a tensor with values (not on the meta device) holds an inf or NaN."""
    return any(not t.is_meta and not bool(torch.isfinite(t).all()) for t in tensors)


def _calls_and_output(model: nn.Module, args: tuple) -> tuple[dict[str, int], object]:
    calls: dict[str, int] = {}
    handles = []
    for path, module in model.named_modules():
        if _is_activation(module):
            calls[path] = 0
            handles.append(module.register_forward_hook(lambda *_, path=path: calls.__setitem__(path, calls[path] + 1)))
    try:
        with torch.no_grad():
            output = model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return calls, output


def activation_calls(model: nn.Module, inputs: object) -> dict[str, int]:
    """How often each activation module runs in one forward of ``model`` on ``inputs``, by its first path.

    Activation modules are torch's (``torch.nn.modules.activation``), timm's (``timm.layers.activations*``),
    transformers', MONAI's and pytorchvideo's (``_ACTIVATION_MODULES``). The forward runs without gradients
    in the model's current train/eval mode; hooks are removed afterwards.
    """
    return _calls_and_output(model, _as_args(inputs))[0]


@contextlib.contextmanager
def _left_as_found(*models: nn.Module) -> Iterator[None]:
    """Restore train/eval flags, buffers, ``.grad`` and the RNG state of ``models`` on exit."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    buffers = [(b, b.detach().clone()) for model in models for b in model.buffers()]
    grads = [(p, p.grad) for model in models for p in model.parameters()]
    devices = sorted({t.device.index or 0 for model in models for t in model.parameters() if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for param, grad in grads:
            param.grad = grad


def _first_non_finite_module(model: nn.Module, args: tuple) -> str | None:
    """The first module (in call order) whose output holds an inf or NaN, re-running the forward without grad."""
    found: list[str] = []
    handles = []

    def hook(module: nn.Module, _: object, output: object, path: str) -> None:
        if not found and _non_finite(_float_tensors(output)):
            found.append(f"{path or '<model>'} ({_type(module)})")

    for path, module in model.named_modules():
        handles.append(module.register_forward_hook(lambda m, a, o, path=path: hook(m, a, o, path)))
    try:
        with torch.no_grad():
            model(*args)
    except Exception:  # only a diagnostic: the first run already failed
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _deselected(paths: Sequence[str], options: dict) -> bool:
    """Whether the report's include/exclude leave this module out (every path must be selected to convert it)."""
    include, exclude = tuple(options.get("include") or ()), tuple(options.get("exclude") or ())
    for path in paths:
        if any(fnmatch.fnmatchcase(path, p) for p in exclude):
            return True
        if include and not any(fnmatch.fnmatchcase(path, p) for p in include):
            return True
    return False


def _check_batchnorm_left(converted: nn.Module, options: dict, gn: int, result: ConversionCheck) -> None:
    paths = _all_paths(converted)
    bcn_parts = {id(m.bn) for m in converted.modules() if isinstance(m, BatchChannelNorm)}
    left = [
        f"{paths[id(m)][0] or '<model>'} ({_type(m)})"
        for m in converted.modules()  # each distinct module once
        if _is_batchnorm_family(m) and id(m) not in bcn_parts and not _deselected(paths[id(m)], options)
    ]
    if left:
        result.violations.append(
            Violation(
                "batchnorm_left",
                f"{len(left)} BatchNorm-family layer(s) left after a gn={gn} conversion: {_shown(left)}",
                tuple(left),
            )
        )


def _check_standardized_twice(converted: nn.Module, result: ConversionCheck) -> None:
    for path, module in converted.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, chain in module.parametrizations.items():
            count = sum(isinstance(p, WeightStandardization) for p in chain)
            where = path or "<model>"
            if count > 1:
                on = "" if name == "weight" else f" on {name}"
                result.violations.append(
                    Violation("standardized_twice", f"{where}: {count} WeightStandardization parametrizations{on}")
                )
            if count and name == "weight" and _standardizes_itself(module):
                cls = parametrize.type_before_parametrizations(module)
                owner = "timm " if cls.__module__.startswith("timm.") else ""
                result.violations.append(
                    Violation("standardized_twice", f"{where}: {owner}{_type(module)} standardized again by wsconvert")
                )


def _standardized_paths(model: nn.Module) -> set[str]:
    """First paths of the modules one of whose tensors is computed by a WeightStandardization."""
    return {
        path
        for path, module in model.named_modules()
        if parametrize.is_parametrized(module)
        and any(isinstance(p, WeightStandardization) for chain in module.parametrizations.values() for p in chain)
    }


def _check_report(original: nn.Module, converted: nn.Module, report: ConversionReport, result: ConversionCheck) -> None:
    listed: set[str] = set()
    for item in [*report.converted, *report.skipped]:
        listed.add(item.path)
        listed.update(item.also_at)
    wanted = [
        f"{path or '<model>'} ({_type(m)})"
        for path, m in original.named_modules()
        if (isinstance(m, _ConvNd) or _is_batchnorm_family(m)) and path not in listed
    ]
    if wanted:
        result.violations.append(
            Violation(
                "report",
                f"{len(wanted)} conv/norm layer(s) missing from the report: {_shown(wanted)}",
                tuple(wanted),
            )
        )
    new = _standardized_paths(converted) - _standardized_paths(original)
    reported: set[str] = set()
    for c in report.converted:
        if c.action == "standardized":
            reported.update((c.path, *c.also_at))
    unreported = sorted(p for p in new if p not in reported)
    absent = sorted(c.path for c in report.converted if c.action == "standardized" and not {c.path, *c.also_at} & new)
    n_reported = sum(c.action == "standardized" for c in report.converted)
    if unreported or absent or len(new) != n_reported:
        details = [f"{p or '<model>'}: standardized but not reported as standardized" for p in unreported]
        details += [
            f"{p or '<model>'}: reported as standardized but carries no new WeightStandardization" for p in absent
        ]
        shown = _shown(unreported + absent)
        result.violations.append(
            Violation(
                "report",
                f"{len(new)} WS-parametrized convs but the report says {n_reported}" + (f": {shown}" if shown else ""),
                tuple(details),
            )
        )


def _run(
    what: str, result: ConversionCheck, errors: list[BaseException], call: Callable[[], T]
) -> tuple[bool, T | None]:
    """``(True, call())``, or ``(False, None)`` with an "error" violation naming ``what`` when it raises."""
    try:
        return True, call()
    except Exception as error:
        errors.append(error)
        text = (str(error).strip().splitlines() or [""])[0][:300]
        result.violations.append(Violation("error", f"{what} raised {type(error).__name__}: {text}"))
        return False, None


def _check_eval(
    original: nn.Module,
    converted: nn.Module,
    args: tuple,
    *,
    check_finite: bool,
    result: ConversionCheck,
    errors: list[BaseException],
) -> None:
    """Activation calls per module path, original against converted, in eval mode; finite eval outputs."""
    original.eval()
    try:
        before, _ = _calls_and_output(original, args)
    except Exception as error:
        raise InvalidOptionError(
            f"check_conversion: the original {type(original).__name__} raised {type(error).__name__} on `inputs` "
            f"in eval mode ({error}); pass inputs the original model runs on (a tuple is the positional arguments)"
        ) from error
    converted.eval()
    ran, found = _run("the converted model's eval forward", result, errors, lambda: _calls_and_output(converted, args))
    if not ran:
        return
    after, output = found
    result.activations_before, result.activations_after = sum(before.values()), sum(after.values())
    changed = [
        f"{path or '<model>'}: {before.get(path, 0)} call(s) before, {after.get(path, 0)} after"
        for path in sorted(set(before) | set(after))
        if before.get(path, 0) != after.get(path, 0)
    ]
    if changed:
        result.violations.append(
            Violation(
                "activations",
                f"activation calls changed: {result.activations_before} before, {result.activations_after} after "
                "conversion",
                tuple(changed),
            )
        )
    if check_finite and _non_finite(_float_tensors(output)):
        first = _first_non_finite_module(converted, args)
        where = (f"first non-finite output: {first}",) if first else ("the re-run to locate it was finite",)
        result.violations.append(Violation("finite", "non-finite output in eval mode", where))


def _check_training(
    converted: nn.Module,
    args: tuple,
    *,
    backward: bool,
    check_finite: bool,
    result: ConversionCheck,
    errors: list[BaseException],
) -> None:
    """A training-mode forward (and backward): finite outputs and gradients, some parameter reached."""
    converted.train()
    for param in converted.parameters():
        param.grad = None
    rng = torch.get_rng_state()
    buffers = [(b, b.detach().clone()) for b in converted.buffers()]
    ran, outputs = _run("the converted model's training-mode forward", result, errors, lambda: converted(*args))
    if not ran:
        return
    tensors = _float_tensors(outputs)
    if not tensors:
        result.violations.append(Violation("backward", "the training-mode forward returned no floating-point tensor"))
        return
    at = len(result.violations)
    if backward:
        _check_backward(converted, tensors, check_finite=check_finite, result=result, errors=errors)
    if check_finite and _non_finite(tensors):
        # located after backward: the re-run must not change buffers the first run saved for backward
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(rng)
        first = _first_non_finite_module(converted, args)
        where = (f"first non-finite output: {first}",) if first else ("the re-run to locate it was finite",)
        result.violations.insert(at, Violation("finite", "non-finite output in training mode", where))


def _check_backward(
    converted: nn.Module,
    tensors: list[torch.Tensor],
    *,
    check_finite: bool,
    result: ConversionCheck,
    errors: list[BaseException],
) -> None:
    loss = sum(t.float().sum() for t in tensors)
    if not loss.requires_grad:
        result.violations.append(
            Violation(
                "backward",
                "backward produced no gradient: the training-mode output does not require grad "
                "(no trainable parameter reaches it; pass backward=False for a frozen model)",
            )
        )
        return
    if not _run("backward of the training-mode output", result, errors, loss.backward)[0]:
        return
    named = [(name, p.grad) for name, p in converted.named_parameters() if p.grad is not None]
    if not named:
        result.violations.append(Violation("backward", "backward produced no gradient"))
    elif check_finite:
        bad = [name for name, grad in named if _non_finite([grad])]
        if bad:
            result.violations.append(Violation("finite", f"non-finite gradient: {_shown(bad)}", tuple(bad)))


def _validate(original: object, converted: object, report: object, gn: object, flags: dict[str, object]) -> int | None:
    for name, model in (("original", original), ("converted", converted)):
        if not isinstance(model, nn.Module):
            raise InvalidOptionError(f"check_conversion: {name} must be an nn.Module, got {type(model).__name__}")
    if converted is original:
        raise InvalidOptionError(
            "check_conversion: original and converted are the same object; it compares the two, so convert a "
            "copy (convert_model's default inplace=False) and pass the unconverted model as original"
        )
    if report is not None and not isinstance(report, ConversionReport):
        raise InvalidOptionError(
            f"check_conversion: report={type(report).__name__} must be a ConversionReport (from plan_conversion) "
            "or None"
        )
    if gn is not None and (isinstance(gn, bool) or not isinstance(gn, int) or gn < 1):
        raise InvalidOptionError(f"check_conversion: gn={gn!r} must be the conversion's integer gn >= 1, or None")
    if report is not None:
        planned = report.options.get("gn")
        if gn is not None and planned is not None and gn != planned:
            raise InvalidOptionError(
                f"check_conversion: gn={gn} but the report was planned with gn={planned}; pass the conversion's gn"
            )
        gn = gn if gn is not None else planned
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise InvalidOptionError(f"check_conversion: {name}={value!r} must be True or False")
    return gn


def check_conversion(
    original: nn.Module,
    converted: nn.Module,
    inputs: object,
    *,
    train_inputs: object = None,
    report: ConversionReport | None = None,
    gn: int | None = None,
    backward: bool = True,
    check_finite: bool = True,
    raise_on_failure: bool = True,
) -> ConversionCheck:
    """Check ``converted = convert_model(original, ...)`` against wsconvert's invariants; see the module docstring.

    ``inputs``: a sample input, as ``example_inputs`` (a tuple is the positional arguments, anything else the
    one argument); ``train_inputs`` (default ``inputs``) is used for the training-mode forward, e.g. images
    and targets of a detection model. ``report``: the ``plan_conversion`` report of the same conversion,
    checked to list every conv and BatchNorm-family layer; its ``gn`` is used when ``gn`` is None. With
    ``gn`` set, no BatchNorm-family layer may remain. ``backward=False`` skips the backward pass (frozen
    models); ``check_finite=False`` skips the finiteness checks (meta tensors are never checked).

    Raises ``ConversionCheckError`` (a WSConvertError and an AssertionError) listing every violated invariant
    with its module paths, unless ``raise_on_failure=False``; returns the ``ConversionCheck``. Bad arguments
    (and an original model that fails on ``inputs``) raise ``InvalidOptionError``. Neither model is changed.
    """
    flags = {"backward": backward, "check_finite": check_finite, "raise_on_failure": raise_on_failure}
    gn = _validate(original, converted, report, gn, flags)
    args = _as_args(inputs)
    train_args = args if train_inputs is None else _as_args(train_inputs)
    result = ConversionCheck()
    result.convs = sum(isinstance(m, _ConvNd) for m in original.modules())
    result.batchnorms = sum(_is_batchnorm_family(m) for m in original.modules())
    result.standardized = len(_standardized_paths(converted) - _standardized_paths(original))
    options = report.options if report is not None else {}
    if gn is not None:
        _check_batchnorm_left(converted, options, gn, result)
    _check_standardized_twice(converted, result)
    if report is not None:
        _check_report(original, converted, report, result)
    errors: list[BaseException] = []
    with _left_as_found(original, converted):
        _check_eval(original, converted, args, check_finite=check_finite, result=result, errors=errors)
        _check_training(
            converted, train_args, backward=backward, check_finite=check_finite, result=result, errors=errors
        )
    if raise_on_failure and not result.ok:
        raise ConversionCheckError(result) from (errors[0] if errors else None)
    return result
