"""Plan once, apply: ``make_plan`` reads the model once and decides everything; ``Plan.apply`` carries it out.

One walk (``walk.find_sites``, inside ``walk.plan``) finds every module; at most one torch.fx trace and at most one
forward pass on the example input gather every observation (the unnormalized-conv probe, wsconvert.probes
.unnormalized, and each norm layer's values per channel, wsconvert.probes.pooled, share that pass); the probes'
findings join the steps by module identity; the report is built once, from the final steps. ``apply`` maps the
steps onto a deep copy through ``copy.deepcopy``'s memo (module identity, never path strings), or converts the
model itself, transactionally: any failure, in the walk or in the preserve step, is undone and raised once, with
its context, at this boundary. This follows einops' recipe design (einops/einops.py: a pattern is prepared once
into a recipe that is then applied, and ``reduce`` adds "Error while processing ..." to an error once, at the
public function).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import walk
from .errors import InvalidOptionError, UnsupportedModuleError, WSConvertError
from .integrations.wrappers import check_unwrapped
from .options import ConversionOptions
from .preserve.calibrate import calibration_batches, eval_mode, run_model
from .preserve.fidelity import Fidelity
from .preserve.steps import finish, preserve_notes, preserved_tensors
from .probes.pooled import (
    ValuesPerChannel,
    give_pooled_norms_one_group,
    needs_values_per_channel,
    warn_unusable_input,
)
from .probes.unnormalized import (
    ProbeResult,
    probe_report_fields,
    resolve_example_inputs,
    run_forward,
    skip_unnormalized_steps,
    start_probe,
)
from .report import ConversionReport, warn_loud_hints
from .rules import Rule, resolve
from .rules.kinds import norm_types_in
from .walk import Site, Step, Transaction
from .ws.bake import own_parametrized_class

__all__ = ["Observations", "Plan", "make_plan"]


@dataclass(frozen=True)
class Observations:
    """What ``make_plan`` saw while reading the model (nothing here changes it).

    ``probe``: the unnormalized-conv probe's result (None when it was not needed: ``convert_model`` without
    ``skip_unnormalized``). ``values_per_channel``: each norm layer's fewest values per channel per sample on the
    example input, keyed by the layer's first path (empty without an input or without groups to choose);
    ``values_of(module)`` looks a layer up by identity. ``forward_failure``: why the one forward pass on the
    example input failed ("" when it ran or was not needed).
    """

    probe: ProbeResult | None = None
    values_per_channel: dict[str, int] = field(default_factory=dict)
    forward_failure: str = ""
    by_module: dict[int, int] = field(default_factory=dict, repr=False, compare=False)  # id(norm) -> values

    def values_of(self, module: nn.Module) -> int | None:
        return self.by_module.get(id(module))


class Plan:
    """The decisions for one model: ``steps`` (final, after the probes adjusted them), ``options``,
    ``observations``, ``report`` (built once from the final steps; ``str(plan)`` is the report) and ``fidelity``
    (None until an ``apply`` with calibration data measured it).

    The report describes the plan and is never changed afterwards: an ``apply`` that measures fidelity sets
    ``plan.fidelity`` only (``plan_conversion(calibration_data=...)`` returns a report built with it).
    """

    def __init__(
        self,
        model: nn.Module,
        steps: Sequence[Step],
        options: ConversionOptions,
        observations: Observations,
        batches: list[Tensor] | None,
        one_group: frozenset[int],
    ) -> None:
        self.steps: tuple[Step, ...] = tuple(steps)
        self.options = options
        self.observations = observations
        self.fidelity: Fidelity | None = None
        self._model = model
        self._batches = batches
        self._one_group = one_group
        self._applied_in_place = False
        self.report: ConversionReport = self.build_report()

    def build_report(self, fidelity: Fidelity | None = None) -> ConversionReport:
        """A new report of this plan, in one go: the steps' rows, the probe's findings, preserve notes and
        ``fidelity`` (``plan.report`` is ``build_report()``; it is not patched afterwards)."""
        fields = walk.report_fields(self.steps, self.options, one_group=self._one_group)
        probe = self.observations.probe
        if probe is not None:
            unnormalized, detection, probe_notes = probe_report_fields(list(self.steps), probe, self.options)
        else:
            unnormalized, detection, probe_notes = [], "", []
        fields["notes"] = [*fields["notes"], *probe_notes, *preserve_notes(self.steps, self.options)]
        return ConversionReport(
            **fields, unnormalized=unnormalized, unnormalized_detection=detection, fidelity=fidelity
        )

    def __str__(self) -> str:
        return str(self.report)

    def __repr__(self) -> str:
        counts = self.report.summary()
        return f"<Plan for {type(self._model).__name__}: {counts}>"

    def apply(self, model: nn.Module, *, inplace: bool = False) -> nn.Module:
        """Carry the plan out on ``model``, the model it was made for; returns the converted model (a new module
        only when the model itself is a BatchNorm layer).

        ``inplace=False`` converts a deep copy and leaves ``model`` untouched; ``inplace=True`` converts
        ``model`` itself, transactionally: on any failure (a rule, the preserve step, calibration) the model is
        left exactly as it was (the same module objects, classes, Parameter objects and values, hooks) and a
        WSConvertError names what failed. With calibration data (given to ``make_plan``) the fidelity measured
        here is stored on ``plan.fidelity``. A plan applied in place is spent: the model it read is converted.
        """
        if model is not self._model:
            raise WSConvertError(
                f"this Plan was made for another model (a {type(self._model).__name__}, given a "
                f"{type(model).__name__}): a Plan applies to the model it was made for; make one for this model "
                "with wsconvert.make_plan(model, ...)"
            )
        if self._applied_in_place:
            raise WSConvertError(
                "this Plan was already applied in place, so the model it read is converted now; make a new plan "
                "with wsconvert.make_plan(model, ...)"
            )
        if torch.is_inference_mode_enabled():
            # The tensors a conversion makes (the deep copy, new GroupNorm parameters) would be inference tensors
            # there, which can never be trained: convert outside inference mode.
            with torch.inference_mode(False):
                return self.apply(model, inplace=inplace)
        batches = self._batches
        if inplace:
            refuse_inference_tensors(model)
        reference = None
        if batches is not None:  # the unconverted model, to fit and measure against
            if inplace:
                with eval_mode(model):
                    run_model(model, batches[0], 0, what="original")  # fails before anything is changed
            reference = copy_model(model) if inplace else model
        target, steps = (model, self.steps) if inplace else _copy_with_steps(model, self.steps)
        undo = Transaction()
        try:
            converted = walk.apply(target, steps, self.options, undo=undo)
            if self.options.preserve:
                undo.where = "the preserve step (preserve=True: gain/shift, norm affines, calibration)"
                if inplace:
                    undo.keep_values(preserved_tensors(steps, self.options))
            fidelity = finish(converted, steps, self.options, reference, batches)
        except BaseException as error:
            if not isinstance(error, Exception) or not undo.where:
                undo.rollback()
                raise
            raise undo.error(error) from error
        self.fidelity = fidelity
        self._applied_in_place = inplace
        return converted


def make_plan(
    model: nn.Module,
    *,
    gn: int | None = None,
    eps: float = 1e-5,
    style: str = "standard",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    skip_depthwise: bool = False,
    skip_unnormalized: bool = False,
    norm: str | None = None,
    bcn_estimate: float | None = None,
    preserve: bool = False,
    standardize_frozen: bool = False,
    calibration_steps: int | None = None,
    example_inputs: object = None,
    input_shape: Sequence[int] | None = None,
    calibration_data: object = None,
    rules: Sequence[Rule] | None = None,
) -> Plan:
    """Decide what converting ``model`` with these options does, without changing it; ``plan.apply(model)``
    carries it out (see ``convert_model`` / ``plan_conversion`` for the options, and docs/api.md).

    ``rules`` (``wsconvert.rules.Rule`` entries) are consulted before the built-in table. The model is read by
    one walk, at most one torch.fx trace (the unnormalized-conv probe) and at most one forward pass on the example
    input (values per channel of norm layers, and the hook-based probe when fx cannot trace).
    """
    options = ConversionOptions.from_arguments(locals())
    return plan_for(model, options, example_inputs, input_shape, calibration_data, rules, report_probe=True)


def plan_for(
    model: object,
    options: ConversionOptions,
    example_inputs: object,
    input_shape: Sequence[int] | None,
    calibration_data: object,
    rules: Sequence[Rule] | None,
    *,
    report_probe: bool,
) -> Plan:
    """``make_plan`` with built options. ``report_probe=False`` (convert_model) runs the unnormalized-conv probe
    only when ``skip_unnormalized`` needs it: the report that would list its findings is not returned there."""
    model = check_model(model)
    batches = calibration_batches(calibration_data, preserve=options.preserve)  # validate before any work
    example = resolve_example_inputs(model, example_inputs, input_shape)
    resolved = resolve(rules)  # this call's rules, the registered ones, the built-ins
    steps = walk.plan(model, options, resolved)  # the one walk; raises on unconvertible modules
    wanted = report_probe or options.skip_unnormalized
    # The probes resolve the call's own rules themselves (wsconvert.rules.kinds): pass those, not ``resolved``,
    # or every rule lookup there would run over the registered and built-in rules twice.
    observations = observe(model, example, options, probe=wanted, rules=rules)
    steps = skip_unnormalized_steps(steps, observations.probe, options)
    steps, one_group = give_pooled_norms_one_group(steps, observations.by_module)
    plan = Plan(model, steps, options, observations, batches, one_group)
    warn_loud_hints(plan.report)  # a probe that could not classify, or a model frozen as a whole: loudly
    return plan


def observe(
    model: nn.Module, example: object, options: ConversionOptions, *, probe: bool, rules: Sequence[Rule] | None = None
) -> Observations:
    """Every observation the plan needs: at most one fx trace (``start_probe``) and at most one forward pass on
    ``example`` shared by the hook-based probe (when fx cannot trace) and the values-per-channel recorder. Without
    ``example`` the probe runs on an input built from the model (``synthetic_input``); group sizes are not checked
    on it (that changes the conversion, so it takes the user's input).
    ``rules`` (the call's own, unresolved) tell both which modules are norm layers and convs
    (``wsconvert.rules.is_norm`` / ``is_conv``)."""
    result, pending = start_probe(model, example, rules=rules, synthetic=True) if probe else (None, None)
    values = None
    if needs_values_per_channel(example, options.gn):
        values = ValuesPerChannel(model, norm_types_in(model, rules))
    observers = [o for o in (pending, values) if o is not None]
    inputs = pending.inputs if pending is not None else example  # ``example``, or the probe's synthetic input
    failure = run_forward(model, inputs, observers) if observers else ""
    if pending is not None:
        result = pending.result(failure)
    if values is None:
        return Observations(result, forward_failure=failure)
    if failure:
        warn_unusable_input(f"the forward pass on the example input failed ({failure})", stacklevel=4)
        return Observations(result, forward_failure=failure)
    return Observations(result, values.by_path(), failure, dict(values.by_module))


def check_model(model: object) -> nn.Module:
    """``model`` when it can be converted: an eager nn.Module not wrapped by DDP/FSDP/compile/Opacus."""
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


def refuse_inference_tensors(model: nn.Module) -> None:
    """In-place conversion rewrites the model's own tensors (parametrize ``set_``s each conv weight), which torch
    forbids for inference tensors outside inference mode; a copy gets normal tensors."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_inference():
            raise UnsupportedModuleError(
                f"{name!r} is an inference tensor (the model was built or loaded under torch.inference_mode), so "
                "the model cannot be converted in place; convert a copy (inplace=False, the default: the copy gets "
                "normal tensors, which can also be trained), or build the model outside inference mode"
            )


def copy_model(model: nn.Module, memo: dict | None = None) -> nn.Module:
    """A deep copy whose parametrized modules own their classes (``wsconvert.ws.bake.own_parametrized_class``):
    registering WS on a conv that already carries a parametrization (on its bias, say) adds a property there."""
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as error:  # deepcopy runs arbitrary user __deepcopy__/__reduce__ code
        raise WSConvertError(
            f"cannot deep-copy the {type(model).__name__} to convert a copy ({type(error).__name__}: {error}); "
            "pass inplace=True to convert the model itself"
        ) from error
    for module in copied.modules():
        if parametrize.is_parametrized(module):
            own_parametrized_class(module)
    return copied


def _copy_with_steps(model: nn.Module, steps: Sequence[Step]) -> tuple[nn.Module, list[Step]]:
    """A deep copy of ``model`` and ``steps`` mapped onto it through deepcopy's memo (module identity)."""
    memo: dict = {}
    copied = copy_model(model, memo)

    def mapped(module: nn.Module, path: str) -> nn.Module:
        twin = memo.get(id(module))
        if not isinstance(twin, nn.Module):
            raise WSConvertError(
                f"the deep copy of the {type(model).__name__} did not copy {path or '<model>'} "
                f"({type(module).__name__}) through copy.deepcopy's memo (a custom __deepcopy__?), so the plan "
                "cannot be mapped onto the copy; pass inplace=True to convert the model itself"
            )
        return twin

    moved = []
    for step in steps:
        site = step.site
        parents = [(None if p is None else mapped(p, "a parent of " + site.paths[0]), n) for p, n in site.parents]
        moved.append(
            Step(Site(mapped(site.module, site.paths[0]), list(site.paths), parents), step.rule, step.decision)
        )
    return copied, moved
