"""Norm layers that see one value per channel (after global pooling), and the GroupNorm they should become.

BatchNorm on a globally pooled feature, (N, C, 1, 1) or (N, C), normalizes each channel over the batch:
squeeze-excitation blocks with a norm (timm ReXNet), split attention (ResNeSt), selective kernels
(SKNet) use it. GroupNorm normalizes each sample over the values of a group of channels; on one value
per channel a group of k channels holds only k values, so ``GroupNorm(32, 32)`` returns its bias
whatever the input, and ``GroupNorm(32, 64)`` (two values per group) returns only signs. (Wu & He,
"Group Normalization", arXiv:1803.08494, compute statistics over (C/G, H, W): with H = W = 1 the set is
tiny.) For such layers one group, i.e. a LayerNorm over the channels as GCNet's context block uses on
pooled features (Cao et al., arXiv:1904.11492), is the meaningful GroupNorm.

Whether a layer sees pooled features depends on the input, so this needs a sample input: with
``example_inputs`` / ``input_shape``, ``wsconvert.make_plan`` records every norm layer's values per channel in
its one forward pass (eval mode, no grad, training flags restored; shared with the hook-based unnormalized-conv
probe), and gives the layers that see one value per channel ``GroupNorm(1, C)`` with a note (not a "groups do
not divide" fallback). Without an input the
requested groups are used. Use the input size the model runs at: an input so small that late feature
maps shrink to 1x1 gives those layers one group too. BatchNorm1d on flattened tokens (N*T, C), as in
LeViT, also sees one value per channel; one group there is a LayerNorm over each token's channels.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ProbeUnavailableWarning
from ..rules.kinds import norm_types_in
from .unnormalized import INPUT_FIX, norm_types, run_forward

if TYPE_CHECKING:
    from ..rules.base import Rule

__all__ = [
    "ValuesPerChannel",
    "give_pooled_norms_one_group",
    "needs_values_per_channel",
    "norm_values_per_channel",
    "warn_unusable_input",
]


class ValuesPerChannel:
    """An observer of one forward pass (``wsconvert.probes.unnormalized.run_forward``): for each norm layer that
    ran, its fewest values per channel per sample over all its calls, by module identity (``by_module``) and by
    first path (``by_path``)."""

    def __init__(self, model: nn.Module, norms: tuple[type, ...] | None = None) -> None:
        norms = norm_types() if norms is None else norms
        self.paths: dict[int, str] = {}
        for path, module in model.named_modules():
            if isinstance(module, norms):
                self.paths.setdefault(id(module), path)
        self.modules = [m for m in model.modules() if id(m) in self.paths]
        self.by_module: dict[int, int] = {}
        self.handles: list = []

    def _record(self, module: nn.Module, args: tuple) -> None:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None or x.dim() < 2:
            return
        values = math.prod(x.shape[2:])
        self.by_module[id(module)] = min(values, self.by_module.get(id(module), values))

    def __enter__(self) -> None:
        self.handles = [m.register_forward_pre_hook(self._record) for m in self.modules]

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def by_path(self) -> dict[str, int]:
        return {self.paths[key]: values for key, values in self.by_module.items()}


def norm_values_per_channel(
    model: nn.Module, example_inputs: Any, *, rules: Sequence[Rule] | None = None
) -> tuple[dict[str, int], str]:
    """For each norm layer (first path) that ran: its fewest values per channel per sample, over all calls.

    Norm layers are what ``wsconvert.rules.is_norm`` counts (``rules`` are a call's own rules). Returns
    ``({path: values}, "")``, or ``({}, why)`` when the forward pass fails (never raises).
    """
    observer = ValuesPerChannel(model, norm_types_in(model, rules))
    failure = run_forward(model, example_inputs, [observer])
    if failure:
        return {}, f"the forward pass on the example input failed ({failure})"
    return observer.by_path(), ""


def needs_values_per_channel(example_inputs: Any, gn: int | None) -> bool:
    """Whether group sizes are checked: there is an input and groups to choose (gn > 1)."""
    return example_inputs is not None and gn is not None and gn != 1


def warn_unusable_input(why: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"the example input could not be used to check GroupNorm group sizes: {why}; the requested groups are "
        f"used; {INPUT_FIX}",
        ProbeUnavailableWarning,
        stacklevel=stacklevel + 1,
    )


def give_pooled_norms_one_group(steps: list, values: Mapping[int, int]) -> tuple[list, frozenset[int]]:
    """Give every planned GroupNorm replacement whose input has one value per channel a single group.

    ``steps`` are ``wsconvert.walk.Step``s; ``values`` maps ``id(module)`` to its values per channel
    (``ValuesPerChannel.by_module``), so steps join by module identity. Only "replace" decisions that choose
    groups are changed. Returns the steps and the ids of the modules given one group (the report lists them with
    a note, not among the "groups do not divide" fallbacks).
    """
    from ..walk import Step

    changed = []
    given = set()
    for step in steps:
        decision = step.decision
        path = step.site.paths[0]
        key = id(step.site.module)
        if decision.action == "replace" and decision.groups not in (None, 1) and values.get(key) == 1:
            per_group = decision.channels // decision.groups
            note = (
                f"{path or '<model>'}: its input has one value per channel on the example input (e.g. after "
                "global pooling), so "
                f"GroupNorm({decision.groups}, {decision.channels}) would normalize {per_group} value(s) per group; "
                "one group (a LayerNorm over the channels) is used instead"
            )
            becomes = decision.becomes.replace(f"({decision.groups}, ", "(1, ", 1)
            decision = dataclasses.replace(decision, groups=1, becomes=becomes, notes=(*decision.notes, note))
            step = Step(step.site, step.rule, decision)
            given.add(key)
        changed.append(step)
    return changed, frozenset(given)
