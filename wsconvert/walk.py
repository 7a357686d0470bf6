"""The generic walk: find every module with all of its paths, plan with the rules, then apply the plan.

Nothing here names a layer type; that knowledge is in rules.py. Planning reads the model and changes
nothing; applying changes each planned module exactly once, even when it is reachable at several paths,
and places a replacement at every one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from .options import ConversionOptions
from .report import ConversionReport, ConvertedModule, GroupFallback, SkippedModule
from .rules import RULES, Decision, Rule, type_name

__all__ = ["Site", "Step", "find_sites", "plan", "apply", "build_report", "carry_module_state"]

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


def apply(root: nn.Module, steps: Sequence[Step], options: ConversionOptions) -> nn.Module:
    """Carry out a plan made on ``root``; returns the new root (a replacement when the root itself was)."""
    for step in steps:
        if step.decision.action == "skip":
            continue
        old = step.site.module
        new = step.rule.apply(old, step.decision, options)
        if new is old:
            continue
        carry_module_state(old, new)
        for parent, name in step.site.parents:
            if parent is None:
                root = new
            else:
                parent._modules[name] = new
    return root


def build_report(steps: Sequence[Step], options: ConversionOptions) -> ConversionReport:
    report = ConversionReport(options=options.to_dict())
    replaced = False
    for step in steps:
        site, decision = step.site, step.decision
        path, also_at = site.paths[0], tuple(site.paths[1:])
        if decision.action == "skip":
            report.skipped.append(SkippedModule(path, type_name(site.module), decision.reason, also_at))
            continue
        action = "standardized" if decision.action == "standardize" else "replaced"
        replaced = replaced or action == "replaced"
        report.converted.append(ConvertedModule(path, type_name(site.module), decision.becomes, action, also_at))
        if decision.groups is not None and decision.groups != options.gn:
            report.group_fallbacks.append(GroupFallback(path, decision.channels, options.gn, decision.groups))
        report.notes.extend(decision.notes)
    if replaced:
        report.notes.append(
            "running statistics (running_mean, running_var, num_batches_tracked) of replaced BatchNorm layers "
            "are dropped: GroupNorm normalizes each sample with its own statistics"
        )
    return report
