"""The rules table: which module types wsconvert converts, what each becomes, how its state is carried.

The walker (walk.py) knows no layer type. For every module it asks the rules in ``RULES`` order; the
first whose ``matches`` is true ``decide``s (standardize in place, replace, or skip with a reason), and
``apply`` carries that decision out. Supporting a new layer type is one more ``Rule`` entry.

Types from optional packages (timm, torchvision) are looked up in ``sys.modules`` only: a model can only
hold instances of a class whose module is already imported, so wsconvert never imports them itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from ..errors import UnsupportedModuleError
from ..norms import bcn
from ..options import ConversionOptions
from ..ws import cached_weight, compat
from ..ws.standardize import WeightStandardization

__all__ = ["Decision", "Rule", "RULES", "choose_groups", "is_standardized", "type_name"]

# GroupNorm eps used when the replaced norm layer had eps <= 0 (COCO FrozenBatchNorm2d weights use 0.0).
_FALLBACK_NORM_EPS = 1e-5


@dataclass(frozen=True)
class Decision:
    """What a rule decided for one module."""

    action: str  # "standardize" (in place), "replace" (a new module) or "skip"
    becomes: str = ""
    reason: str = ""
    groups: int | None = None
    channels: int | None = None
    eps: float | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """One table entry. ``apply`` returns the module to place: the same one for in-place changes."""

    name: str
    matches: Callable[[nn.Module], bool]
    decide: Callable[[nn.Module, str, ConversionOptions], Decision]
    apply: Callable[[nn.Module, Decision, ConversionOptions], nn.Module]


def type_name(module: nn.Module) -> str:
    """The module's class name as the user wrote it (not parametrize's ``ParametrizedConv2d``)."""
    return parametrize.type_before_parametrizations(module).__name__


def _optional_types(module_name: str, *names: str) -> tuple[type, ...]:
    loaded = sys.modules.get(module_name)
    if loaded is None:
        return ()
    return tuple(getattr(loaded, name) for name in names if isinstance(getattr(loaded, name, None), type))


def _timm_standardized_convs() -> tuple[type, ...]:
    return _optional_types(
        "timm.layers.std_conv", "StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"
    )


def _timm_norm_act() -> tuple[type, ...]:
    return _optional_types("timm.layers.norm_act", "BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")


def _frozen_batchnorms() -> tuple[type, ...]:
    return _optional_types("torchvision.ops.misc", "FrozenBatchNorm2d")


def _is_instance(module: nn.Module, types: tuple[type, ...]) -> bool:
    return bool(types) and issubclass(parametrize.type_before_parametrizations(module), types)


def is_standardized(module: nn.Module) -> bool:
    """True when ``module``'s weight is standardized at forward time.

    That is: its ``weight`` carries a :class:`WeightStandardization` parametrization, or it is one of
    timm's StdConv2d / StdConv2dSame / ScaledStdConv2d / ScaledStdConv2dSame.
    """
    if _is_instance(module, _timm_standardized_convs()):
        return True
    if not parametrize.is_parametrized(module, "weight"):
        return False
    return any(isinstance(p, WeightStandardization) for p in module.parametrizations["weight"])


def choose_groups(channels: int, requested: int) -> int:
    """``requested`` when it divides ``channels``, else the largest divisor of ``channels`` below it."""
    for groups in range(min(requested, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def _require_initialized(module: nn.Module, path: str) -> None:
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise UnsupportedModuleError(
            f"{path or '<model>'} ({type(module).__name__}) is a lazy module whose parameters are not "
            "initialized yet; run one forward pass with a sample input first, then convert"
        )


# --- convolutions -------------------------------------------------------------------------------


def _skip(reason: str) -> Decision:
    return Decision("skip", reason=reason)


def _decide_already_standardized(module: nn.Module, path: str, options: ConversionOptions) -> Decision:
    return _skip(f"already weight-standardized ({type_name(module)})")


def _decide_conv(conv: nn.Module, path: str, options: ConversionOptions) -> Decision:
    _require_initialized(conv, path)
    if is_standardized(conv):
        return _skip("already weight-standardized (wsconvert)")
    if parametrize.is_parametrized(conv, "weight"):
        names = ", ".join(type(p).__name__ for p in conv.parametrizations["weight"])
        return _skip(
            f"weight already carries a parametrization ({names}); WS on top would cancel its scaling. "
            "Remove it first to standardize this conv"
        )
    weight = conv._parameters.get("weight")
    if weight is None:
        return _skip(
            "weight is not a parameter of this module (it is computed by a hook, e.g. the deprecated "
            "torch.nn.utils.weight_norm/spectral_norm); remove that hook first"
        )
    if weight.numel() // conv.out_channels == 1:
        return _skip("fan-in 1: standardizing a one-element filter would turn it to zeros")
    if options.skip_depthwise and conv.groups == conv.in_channels > 1:
        return _skip("depthwise conv (skip_depthwise=True)")
    return Decision("standardize", becomes=f"{type_name(conv)}+WS")


def _standardize_conv(conv: nn.Module, decision: Decision, options: ConversionOptions) -> nn.Module:
    ws = WeightStandardization.for_conv(conv, options.eps, options.style)
    # unsafe=True skips parametrize's trial evaluation: WS never changes shape or dtype.
    parametrize.register_parametrization(conv, "weight", ws, unsafe=True)
    cached_weight.install(conv)
    compat.accept_plain_weight(conv)
    return conv


# --- norm layers --------------------------------------------------------------------------------


def _inherits_batchnorm_forward(module: nn.Module) -> bool:
    return type(module).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def _norm_decision(module: nn.Module, path: str, options: ConversionOptions, target: str) -> Decision:
    _require_initialized(module, path)
    if options.gn is None:
        return _skip("norm layer kept (gn not set)")
    affine = _affine_source(module)
    unusable = [f"{name} ({entry.value})" for name, entry in affine.items() if entry.kind == "unregistered"]
    if unusable:
        return _skip(
            f"affine {', '.join(unusable)} is neither a parameter, a buffer nor a parametrization of this module "
            "(computed by a hook, e.g. the deprecated torch.nn.utils.weight_norm); remove that hook first"
        )
    channels = _channels(module, affine)
    groups = choose_groups(channels, options.gn)
    eps = float(module.eps)
    where = path or "<model>"
    notes = tuple(
        f"{where}: the parametrization of {name} ({entry.value}) is carried over to the {target}: the same "
        "ParametrizationList, the same original tensor"
        for name, entry in affine.items()
        if entry.kind == "parametrized"
    )
    if eps <= 0:
        notes += (
            f"{where}: eps {eps} raised to {_FALLBACK_NORM_EPS} in GroupNorm (a zero eps divides "
            "by zero on a constant group)",
        )
        eps = _FALLBACK_NORM_EPS
    return Decision(
        "replace", becomes=f"{target}({groups}, {channels})", groups=groups, channels=channels, eps=eps, notes=notes
    )


def _decide_batchnorm(module: nn.Module, path: str, options: ConversionOptions) -> Decision:
    if options.norm == "bcn":
        return bcn.with_notes(_norm_decision(module, path, options, "BatchChannelNorm"), module, path, options)
    return _norm_decision(module, path, options, "GroupNorm")


def _decide_norm_act(module: nn.Module, path: str, options: ConversionOptions) -> Decision:
    if options.norm == "bcn":
        return bcn.with_notes(_norm_decision(module, path, options, "BatchChannelNormAct"), module, path, options)
    return _norm_decision(module, path, options, "GroupNormAct")


def _decide_custom_batchnorm(module: nn.Module, path: str, options: ConversionOptions) -> Decision:
    return _skip(
        f"{type(module).__name__} subclasses BatchNorm but overrides forward(); a plain GroupNorm could drop "
        "what that forward adds (e.g. an activation). Add a rule for it to wsconvert.rules.RULES"
    )


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

    ``_norm_decision`` skips what ``_group_norm`` could not build, so the plan and the conversion agree.
    """
    return {name: _affine_entry(module, name) for name in ("weight", "bias")}


def _channels(module: nn.Module, affine: dict[str, _AffineEntry]) -> int:
    if hasattr(module, "num_features"):
        return int(module.num_features)
    for name in ("weight", "bias", "running_mean"):
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise UnsupportedModuleError(f"{type(module).__name__}: cannot tell its number of channels")


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


def _group_norm(norm: nn.Module, decision: Decision, factory: type[nn.GroupNorm]) -> nn.GroupNorm:
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
            else:  # _norm_decision skips these
                raise UnsupportedModuleError(f"{type_name(norm)}.{name} is a {entry.value}, not a tensor it owns")
    compat.ignore_running_statistics(gn)
    return gn


def _plain_group_norm(channels: int, groups: int, **kwargs) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, **kwargs)


def _batchnorm_to_groupnorm(norm: nn.Module, decision: Decision, options: ConversionOptions) -> nn.Module:
    if options.norm == "bcn":
        return bcn.from_batchnorm(norm, decision.groups, decision.eps, options.bcn_estimate)
    return _group_norm(norm, decision, _plain_group_norm)


def _norm_act_to_group_norm_act(norm: nn.Module, decision: Decision, options: ConversionOptions) -> nn.Module:
    if options.norm == "bcn":
        return bcn.from_batchnorm(norm, decision.groups, decision.eps, options.bcn_estimate, act=True)
    from timm.layers import GroupNormAct  # the model holds a timm module, so timm is importable

    gn = _group_norm(norm, decision, GroupNormAct)
    gn.drop = norm.drop
    gn.act = norm.act
    return gn


# --- the table ----------------------------------------------------------------------------------

RULES: list[Rule] = [
    Rule(
        "BatchNorm part of a BatchChannelNorm",
        matches=bcn.is_batch_channel_part,
        decide=lambda m, p, o: _skip("the BatchNorm part of a BatchChannelNorm (already converted)"),
        apply=lambda m, d, o: m,
    ),
    Rule(
        "timm standardized conv",
        matches=lambda m: _is_instance(m, _timm_standardized_convs()),
        decide=_decide_already_standardized,
        apply=lambda m, d, o: m,
    ),
    Rule(
        "convolution",
        matches=lambda m: isinstance(m, _ConvNd),
        decide=_decide_conv,
        apply=_standardize_conv,
    ),
    Rule(
        "timm norm+act",
        matches=lambda m: _is_instance(m, _timm_norm_act()),
        decide=_decide_norm_act,
        apply=_norm_act_to_group_norm_act,
    ),
    Rule(
        "batchnorm",
        matches=lambda m: isinstance(m, _BatchNorm) and _inherits_batchnorm_forward(m),
        decide=_decide_batchnorm,
        apply=_batchnorm_to_groupnorm,
    ),
    Rule(
        "batchnorm subclass with its own forward",
        matches=lambda m: isinstance(m, _BatchNorm),
        decide=_decide_custom_batchnorm,
        apply=lambda m, d, o: m,
    ),
    Rule(
        "frozen batchnorm",
        matches=lambda m: _is_instance(m, _frozen_batchnorms()),
        decide=_decide_batchnorm,
        apply=_batchnorm_to_groupnorm,
    ),
]
