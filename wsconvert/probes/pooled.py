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
``example_inputs`` / ``input_shape``, ``convert_model`` and ``plan_conversion`` run one forward pass
(eval mode, no grad, training flags restored), record every norm layer's values per channel, and give
the layers that see one value per channel ``GroupNorm(1, C)`` with a note. Without an input the
requested groups are used. Use the input size the model runs at: an input so small that late feature
maps shrink to 1x1 gives those layers one group too. BatchNorm1d on flattened tokens (N*T, C), as in
LeViT, also sees one value per channel; one group there is a LayerNorm over each token's channels.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import ProbeUnavailableWarning
from .unnormalized import INPUT_FIX, _as_args, _error_text, norm_types

__all__ = ["norm_values_per_channel", "one_group_for_pooled_norms", "pooled_norm_sizes"]


def norm_values_per_channel(model: nn.Module, example_inputs: Any) -> tuple[dict[str, int], str]:
    """For each norm layer (first path) that ran: its fewest values per channel per sample, over all calls.

    Returns ``({path: values}, "")``, or ``({}, why)`` when the forward pass fails (never raises).
    """
    paths: dict[int, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, norm_types()):
            paths.setdefault(id(module), path)
    sizes: dict[str, int] = {}

    def record(module: nn.Module, args: tuple) -> None:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None or x.dim() < 2:
            return
        values = math.prod(x.shape[2:])
        path = paths[id(module)]
        sizes[path] = min(values, sizes.get(path, values))

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if id(m) in paths]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*_as_args(example_inputs))
    except Exception as error:  # the user's forward on the user's input
        return {}, f"the forward pass on the example input failed ({_error_text(error)})"
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return sizes, ""


def one_group_for_pooled_norms(steps: list, sizes: dict[str, int]) -> list:
    """Give every planned GroupNorm replacement whose input has one value per channel a single group.

    ``steps`` are ``wsconvert.walk.Step``s; only "replace" decisions that choose groups are changed.
    """
    from ..walk import Step

    changed = []
    for step in steps:
        decision = step.decision
        path = step.site.paths[0]
        if decision.action == "replace" and decision.groups not in (None, 1) and sizes.get(path) == 1:
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
        changed.append(step)
    return changed


def pooled_norm_sizes(model: nn.Module, example_inputs: Any, gn: int | None) -> dict[str, int]:
    """``norm_values_per_channel`` when there is an input and groups to choose; ``{}`` otherwise.

    A failing forward pass gives ``{}`` and a warning (the requested groups are then used).
    """
    if example_inputs is None or gn is None or gn == 1:
        return {}
    sizes, why = norm_values_per_channel(model, example_inputs)
    if why:
        warnings.warn(
            f"the example input could not be used to check GroupNorm group sizes: {why}; the requested groups are "
            f"used; {INPUT_FIX}",
            ProbeUnavailableWarning,
            stacklevel=3,
        )
    return sizes
