"""Norm layers: the GroupNorm (Wu & He, arXiv:1803.08494) that replaces a BatchNorm-like layer, state carried over.

``norm_decision`` and ``group_norm`` are what the built-in BatchNorm rules and ``wsconvert.rules.replace_norm``
use. A BatchNorm-like layer holds its affine ``weight`` / ``bias`` as parameters (torch BatchNorm), buffers
(torchvision FrozenBatchNorm2d, transformers ``DetrFrozenBatchNorm2d``) or parametrizations; the GroupNorm
gets the same tensors (a Parameter is reused, so an optimizer holding it keeps working).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from ..errors import UnsupportedModuleError
from ..options import ConversionOptions
from ..ws import compat
from .base import Decision, choose_groups, type_name
from .conv import require_initialized, skip

__all__ = ["FALLBACK_NORM_EPS", "group_norm", "inherits_batchnorm_forward", "norm_decision", "plain_group_norm"]

# GroupNorm eps used when the replaced norm layer had eps <= 0 (COCO FrozenBatchNorm2d weights use 0.0), and
# for a layer without an ``eps`` attribute unless its rule says otherwise.
FALLBACK_NORM_EPS = 1e-5


def inherits_batchnorm_forward(module: nn.Module) -> bool:
    """True when ``module``'s forward is torch's BatchNorm (or SyncBatchNorm) forward, not an override."""
    return type(module).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)


@dataclass(frozen=True)
class _AffineEntry:
    """How a BatchNorm-like module holds its affine ``weight`` or ``bias``.

    ``kind`` is "absent" (None: ``BatchNorm2d`` with ``bias = None``, a weight-only affine), "parameter",
    "buffer" (torchvision FrozenBatchNorm2d), "parametrized" (torch.nn.utils.parametrize; ``tensor`` is the
    ParametrizationList) or "unregistered" (a plain attribute, e.g. set by a hook). ``value`` describes it.
    """

    kind: str
    tensor: object = None
    value: str = ""


def _affine_entry(module: nn.Module, name: str) -> _AffineEntry:
    if parametrize.is_parametrized(module, name):
        chain = module.parametrizations[name]
        return _AffineEntry("parametrized", chain, ", ".join(type(p).__name__ for p in chain))
    for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
        if name in tensors:
            tensor = tensors[name]
            return _AffineEntry("absent") if tensor is None else _AffineEntry(kind, tensor)
    value = getattr(module, name, None)
    return _AffineEntry("absent") if value is None else _AffineEntry("unregistered", value, type(value).__name__)


def _affine_source(module: nn.Module) -> dict[str, _AffineEntry]:
    """The affine ``weight`` and ``bias`` of a BatchNorm-like module, as plan and apply both read them.

    ``norm_decision`` skips what ``group_norm`` could not build, so the plan and the conversion agree.
    """
    return {name: _affine_entry(module, name) for name in ("weight", "bias")}


def _channels(module: nn.Module) -> int:
    if hasattr(module, "num_features"):
        return int(module.num_features)
    for name in ("weight", "bias", "running_mean"):
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise UnsupportedModuleError(f"{type(module).__name__}: cannot tell its number of channels")


def norm_decision(
    module: nn.Module, path: str, options: ConversionOptions, target: str, default_eps: float = FALLBACK_NORM_EPS
) -> Decision:
    """Replace ``module`` by ``target`` ("GroupNorm", "BatchChannelNorm", ...) with groups chosen for its channels.

    The eps is ``module.eps``, or ``default_eps`` for a layer without one (transformers' DETR frozen BatchNorm
    hard-codes 1e-5 in its forward). Skipped when ``gn`` is not set or the affine is not a tensor it owns.
    """
    require_initialized(module, path)
    if options.gn is None:
        return skip("norm layer kept (gn not set)")
    affine = _affine_source(module)
    unusable = [f"{name} ({entry.value})" for name, entry in affine.items() if entry.kind == "unregistered"]
    if unusable:
        return skip(
            f"affine {', '.join(unusable)} is neither a parameter, a buffer nor a parametrization of this module "
            "(computed by a hook, e.g. the deprecated torch.nn.utils.weight_norm); remove that hook first"
        )
    channels = _channels(module)
    groups = choose_groups(channels, options.gn)
    eps = float(getattr(module, "eps", default_eps))
    where = path or "<model>"
    notes = tuple(
        f"{where}: the parametrization of {name} ({entry.value}) is carried over to the {target}: the same "
        "ParametrizationList, the same original tensor"
        for name, entry in affine.items()
        if entry.kind == "parametrized"
    )
    if eps <= 0:
        notes += (
            f"{where}: eps {eps} raised to {FALLBACK_NORM_EPS} in GroupNorm (a zero eps divides "
            "by zero on a constant group)",
        )
        eps = FALLBACK_NORM_EPS
    return Decision(
        "replace", becomes=f"{target}({groups}, {channels})", groups=groups, channels=channels, eps=eps, notes=notes
    )


def _as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    """Reuse a Parameter as is (an optimizer holding it keeps working); freeze a copy of a buffer."""
    if isinstance(tensor, nn.Parameter):
        return tensor
    return nn.Parameter(tensor.detach().clone(), requires_grad=False)


def _carry_parametrization(gn: nn.Module, name: str, chain: nn.Module) -> None:
    """Make ``gn.<name>`` go through the very ParametrizationList ``chain`` (same modules, same ``original``).

    parametrize has no public way to move a parametrization, so an identity one is registered on the
    GroupNorm's own placeholder Parameter (no right_inverse, unsafe: nothing is evaluated), which sets up the
    per-module class and property, then its ParametrizationList is replaced by ``chain``.
    """
    parametrize.register_parametrization(gn, name, nn.Identity(), unsafe=True)
    gn.parametrizations[name] = chain


def plain_group_norm(channels: int, groups: int, **kwargs: object) -> nn.GroupNorm:
    """``nn.GroupNorm`` with the ``(channels, groups, ...)`` argument order of timm's GroupNormAct."""
    return nn.GroupNorm(groups, channels, **kwargs)


def group_norm(norm: nn.Module, decision: Decision, factory: type[nn.GroupNorm] = plain_group_norm) -> nn.GroupNorm:
    """The GroupNorm ``decision`` planned for ``norm``, holding ``norm``'s affine tensors (running stats dropped)."""
    affine = _affine_source(norm)
    tensors = (getattr(norm, name, None) for name in ("weight", "bias", "running_mean"))
    reference = next((t for t in tensors if isinstance(t, torch.Tensor)), None)  # gives device and dtype
    has_affine = any(entry.kind != "absent" for entry in affine.values())
    kwargs = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
    gn = factory(decision.channels, decision.groups, eps=decision.eps, affine=has_affine, **kwargs)
    if has_affine:
        # GroupNorm's forward passes weight and bias to F.group_norm separately, so either may be None: a
        # weight-only BatchNorm becomes a GroupNorm without bias (the same function, the same state dict keys).
        for name, entry in affine.items():
            if entry.kind == "absent":
                gn.register_parameter(name, None)
            elif entry.kind == "parametrized":
                _carry_parametrization(gn, name, entry.tensor)
            elif entry.kind in ("parameter", "buffer"):
                setattr(gn, name, _as_parameter(entry.tensor))
            else:  # norm_decision skips these
                raise UnsupportedModuleError(f"{type_name(norm)}.{name} is a {entry.value}, not a tensor it owns")
    compat.ignore_running_statistics(gn)
    return gn
