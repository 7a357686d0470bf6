"""The generic walk: find every module with all of its paths, plan with the rules, then apply the plan.

Nothing here names a layer type; that knowledge is in rules.py. Planning reads the model and changes
nothing; applying changes each planned module exactly once, even when it is reachable at several paths,
and places a replacement at every one of them. Applying is all or nothing: a failure undoes what was done.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import WSConvertError
from .options import ConversionOptions
from .report import ConvertedModule, GroupFallback, SkippedModule
from .rules.builtin import RULES, Decision, Rule, type_name

__all__ = [
    "Site",
    "Step",
    "Transaction",
    "find_sites",
    "plan",
    "apply",
    "report_fields",
    "carry_module_state",
]

# Hook dictionaries moved to a replacement. The replacement shares the very dict objects, so the
# RemovableHandle a user holds still removes the hook.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_CARRIED_ATTRIBUTES = ("_is_full_backward_hook", "qconfig")


@dataclass
class Site:
    """One distinct module, every path it is reachable at, and every (parent, child name) edge to it."""

    module: nn.Module
    paths: list[str] = field(default_factory=list)
    parents: list[tuple[nn.Module | None, str]] = field(default_factory=list)


@dataclass
class Step:
    site: Site
    rule: Rule
    decision: Decision


def find_sites(root: nn.Module) -> list[Site]:
    """Every distinct module under ``root`` in definition order, with all its paths ("" is the root)."""
    sites: dict[int, Site] = {}
    ordered: list[Site] = []

    def visit(module: nn.Module, path: str, parent: nn.Module | None, name: str, ancestors: set[int]) -> None:
        site = sites.get(id(module))
        if site is None:
            site = sites[id(module)] = Site(module)
            ordered.append(site)
        site.paths.append(path)
        edge = (parent, name)
        if not any(p is parent and n == name for p, n in site.parents):
            site.parents.append(edge)
        ancestors = ancestors | {id(module)}
        for child_name, child in module._modules.items():
            if child is not None and id(child) not in ancestors:
                visit(child, f"{path}.{child_name}" if path else child_name, module, child_name, ancestors)

    visit(root, "", None, "", set())
    return ordered


def plan(root: nn.Module, options: ConversionOptions, rules: Sequence[Rule] = RULES) -> list[Step]:
    """Decide, without changing anything, what happens to every module that some rule matches."""
    steps = []
    for site in find_sites(root):
        rule = next((r for r in rules if r.matches(site.module)), None)
        if rule is None:
            continue
        reason = options.deselected_reason(site.paths)
        if reason is not None:
            decision = Decision("skip", reason=reason)
        else:
            decision = rule.decide(site.module, site.paths[0], options)
            if not isinstance(decision, Decision):
                raise WSConvertError(
                    f"rule {rule.name!r} decided {type(decision).__name__} {decision!r} for "
                    f"{site.paths[0] or '<model>'} ({type_name(site.module)}); a rule's decide must return a "
                    "wsconvert.rules.Decision"
                )
        steps.append(Step(site, rule, decision))
    return steps


def carry_module_state(old: nn.Module, new: nn.Module) -> None:
    """Give a replacement its predecessor's training flag, hooks and qconfig."""
    new.training = old.training
    for attribute in _HOOK_DICTS:
        hooks = getattr(old, attribute, None)
        if hooks:
            setattr(new, attribute, hooks)
    for attribute in _CARRIED_ATTRIBUTES:
        if attribute in old.__dict__:
            setattr(new, attribute, old.__dict__[attribute])


class _ModuleSnapshot:
    """A module's own state before a rule changes it in place, to put back if the conversion fails.

    Kept: its class, every instance attribute, the contents of its dict/set attributes (``_parameters``,
    ``_buffers``, ``_modules``, every hook dict: the same Parameter and hook objects, in the same order), and the
    attributes of parametrize's per-module class (registering a parametrization injects a property there).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.cls = type(module)
        self.attributes = dict(module.__dict__)
        self.contents = {k: v.copy() for k, v in self.attributes.items() if isinstance(v, (dict, set))}
        per_module_class = parametrize.is_parametrized(module)
        self.class_attributes = dict(vars(self.cls)) if per_module_class else None

    def restore(self) -> None:
        state = self.module.__dict__
        for key in [k for k in state if k not in self.attributes]:
            del state[key]
        for key, value in self.attributes.items():
            state[key] = value
            if key in self.contents:
                value.clear()
                value.update(self.contents[key])
        if self.class_attributes is not None:
            for name in [n for n in vars(self.cls) if n not in self.class_attributes]:
                delattr(self.cls, name)
            for name, value in self.class_attributes.items():
                if vars(self.cls).get(name) is not value:
                    setattr(self.cls, name, value)
        self.module.__class__ = self.cls


def _own_state(module: nn.Module) -> list[nn.Module]:
    """``module`` and the parametrize containers that hold its state (registering a parametrization on one
    more tensor adds to its existing ``parametrizations`` ModuleDict, and to a ParametrizationList)."""
    if not parametrize.is_parametrized(module):
        return [module]
    return [module, module.parametrizations, *module.parametrizations.values()]


class Transaction:
    """The undo log of one conversion: module snapshots, parent swaps and tensor values, put back last first.

    ``walk.apply`` records its changes here; ``wsconvert.plan.Plan.apply`` also records what the preserve step
    writes (``keep_values``), so a failure anywhere leaves the model as it was. ``where`` names what was being
    done, for the one error raised at the boundary (``error``).
    """

    def __init__(self) -> None:
        self.actions: list[Callable[[], None]] = []
        self.where = ""

    def snapshot(self, module: nn.Module) -> None:
        self.actions.extend(_ModuleSnapshot(m).restore for m in _own_state(module))

    def swap(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        self.actions.append(functools.partial(parent._modules.__setitem__, name, parent._modules[name]))
        parent._modules[name] = new

    def keep_values(self, tensors: Sequence) -> None:
        """Record the current values of ``tensors`` (the same tensor objects get them back on rollback)."""
        saved = [(t, t.detach().clone()) for t in tensors]

        def restore() -> None:
            with torch.no_grad():
                for tensor, value in saved:
                    tensor.copy_(value)

        self.actions.append(restore)

    def rollback(self) -> str:
        """Undo everything recorded; what failed to be put back, as one line (empty when everything was)."""
        actions, self.actions = self.actions, []
        return _undo(actions)

    def error(self, error: Exception) -> WSConvertError:
        """Roll back and describe ``error`` once, naming ``where`` it happened."""
        unrestored = self.rollback()
        message = (
            f"{self.where or 'converting the model'} failed: {type(error).__name__}: {error}. "
            "The model was left as it was (what was done before was undone)"
        )
        if unrestored:
            return WSConvertError(
                f"{message}; but undoing it failed too ({unrestored}): the model may be partly converted, rebuild it"
            )
        try:
            return type(error)(message) if isinstance(error, WSConvertError) else WSConvertError(message)
        except Exception:  # a subclass with another signature
            return WSConvertError(message)


def _where(step: Step) -> str:
    path = step.site.paths[0] or "<model>"
    return f"converting {path} ({type_name(step.site.module)}, rule {step.rule.name!r})"


def apply(
    root: nn.Module, steps: Sequence[Step], options: ConversionOptions, *, undo: Transaction | None = None
) -> nn.Module:
    """Carry out a plan made on ``root``; returns the new root (a replacement when the root itself was).

    Transactional: every in-place change and every swap in a parent is recorded, and on any exception they
    are undone in reverse order, so ``root`` is left exactly as it was (the same module objects, classes,
    Parameter objects, hooks and state dict keys). The error is a WSConvertError naming the module. Given an
    ``undo`` Transaction, the changes are recorded there and, on failure, left for its owner to roll back (the
    error passes through as it is, with ``undo.where`` naming the module): the owner is the one boundary.
    """
    transaction = Transaction() if undo is None else undo
    try:
        for step in steps:
            if step.decision.action == "skip":
                continue
            transaction.where = _where(step)
            old = step.site.module
            transaction.snapshot(old)
            new = step.rule.apply(old, step.decision, options)
            if new is old:
                continue
            carry_module_state(old, new)
            for parent, name in step.site.parents:
                if parent is None:
                    root = new
                else:
                    transaction.swap(parent, name, new)
    except BaseException as error:
        if undo is not None:
            raise
        if not isinstance(error, Exception) or not transaction.where:
            transaction.rollback()
            raise
        raise transaction.error(error) from error
    return root


def _undo(actions: list[Callable[[], None]]) -> str:
    """Run ``actions`` last first; what failed, as one line (empty when everything was put back)."""
    failed = []
    for action in reversed(actions):
        try:
            action()
        except Exception as error:  # keep putting back the rest
            failed.append(f"{type(error).__name__}: {error}")
    return "; ".join(failed)


def report_fields(
    steps: Sequence[Step], options: ConversionOptions, *, one_group: Collection[int] = frozenset()
) -> dict:
    """The ConversionReport fields that ``steps`` determine: options, converted, skipped, group_fallbacks, notes.

    A group count that differs from ``options.gn`` is a fallback (the requested groups do not divide the
    channels) unless the module's id is in ``one_group``: given one group because it sees one value per channel
    (wsconvert.probes.pooled), which its decision's note says.
    """
    converted: list[ConvertedModule] = []
    skipped: list[SkippedModule] = []
    fallbacks: list[GroupFallback] = []
    notes: list[str] = []
    replaced = False
    for step in steps:
        site, decision = step.site, step.decision
        path, also_at = site.paths[0], tuple(site.paths[1:])
        if decision.action == "skip":
            skipped.append(SkippedModule(path, type_name(site.module), decision.reason, also_at))
            continue
        action = "standardized" if decision.action == "standardize" else "replaced"
        replaced = replaced or action == "replaced"
        converted.append(ConvertedModule(path, type_name(site.module), decision.becomes, action, also_at))
        if decision.groups is not None and decision.groups != options.gn and id(site.module) not in one_group:
            fallbacks.append(GroupFallback(path, decision.channels, options.gn, decision.groups))
        notes.extend(decision.notes)
    if replaced and options.norm == "bcn":
        notes.append(
            "replaced BatchNorm layers are kept, running statistics included, as the `bn` part of their "
            "BatchChannelNorm; the new per-group affine starts at weight 1, bias 0"
        )
    elif replaced:
        notes.append(
            "running statistics (running_mean, running_var, num_batches_tracked) of replaced BatchNorm layers "
            "are dropped: GroupNorm normalizes each sample with its own statistics"
        )
    return {
        "options": options.to_dict(),
        "converted": converted,
        "skipped": skipped,
        "group_fallbacks": fallbacks,
        "notes": notes,
    }
