"""What the probes count as a convolution or a normalization layer, and how a user declares more types.

A module is a *norm layer* when it is one of :func:`norm_types` (torch's BatchNorm/SyncBatchNorm, GroupNorm,
LayerNorm, InstanceNorm, RMSNorm; torchvision's and timm's frozen BatchNorms; timm's RmsNorm, SimpleNorm and
EvoNorm layers), a type given to :func:`declare_norm`, or when the first rule that matches it has
``kind="norm"`` (the DETR-style frozen BatchNorm rule, a user's ``replace_norm``). Likewise a *conv*: a torch
``_ConvNd``, a type given to :func:`declare_conv`, or the first matching rule has ``kind="conv"``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from .._optional import loaded_type, loaded_types
from ..errors import InvalidOptionError
from .base import Rule, TypeSpec, matches_types, type_specs
from .registry import resolve

__all__ = [
    "OPTIONAL_NORMS",
    "declare_conv",
    "declare_norm",
    "declared",
    "is_conv",
    "is_norm",
    "norm_types",
    "norm_types_in",
    "undeclare",
]

TORCH_NORMS: tuple[type, ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, _InstanceNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)

# module name -> class names counted as norm layers once that module is imported (looked up, never imported)
OPTIONAL_NORMS = {
    "torchvision.ops.misc": ("FrozenBatchNorm2d",),
    "timm.layers.norm_act": ("FrozenBatchNorm2d", "FrozenBatchNormAct2d", "RmsNormAct", "RmsNormAct2d"),
    "timm.layers.norm": ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32", "SimpleNorm", "SimpleNorm2d"),
    "timm.layers.evo_norm": tuple(
        f"EvoNorm2d{variant}" for variant in ("B0", "B1", "B2", "S0", "S0a", "S1", "S1a", "S2", "S2a")
    ),
}

_DECLARED: dict[str, list[TypeSpec]] = {"norm": [], "conv": []}


def _declare(kind: str, types: tuple[object, ...]) -> None:
    specs = type_specs(types, f"wsconvert.rules.declare_{kind}")
    if not specs:
        raise InvalidOptionError(
            f"wsconvert.rules.declare_{kind}: give at least one class or 'package.module.ClassName'"
        )
    for spec in specs:
        if spec not in _DECLARED[kind]:
            _DECLARED[kind].append(spec)


def declare_norm(*types: TypeSpec) -> None:
    """Count ``types`` (classes or dotted names "package.module.ClassName", subclasses too) as norm layers."""
    _declare("norm", types)


def declare_conv(*types: TypeSpec) -> None:
    """Count ``types`` (classes or dotted names, subclasses too) as convolutions for the unnormalized-conv probe."""
    _declare("conv", types)


def undeclare(*types: TypeSpec) -> None:
    """Forget ``types`` given to ``declare_norm`` / ``declare_conv`` (InvalidOptionError for one never declared)."""
    for spec in type_specs(types, "wsconvert.rules.undeclare"):
        lists = [declared for declared in _DECLARED.values() if spec in declared]
        if not lists:
            raise InvalidOptionError(f"wsconvert.rules.undeclare: {spec!r} was not declared a norm or conv type")
        for declared_list in lists:
            declared_list.remove(spec)


def declared(kind: str) -> tuple[TypeSpec, ...]:
    """The types declared with ``declare_norm`` (``kind="norm"``) or ``declare_conv`` (``kind="conv"``)."""
    if kind not in _DECLARED:
        raise InvalidOptionError(f"wsconvert.rules.declared: kind={kind!r} must be 'norm' or 'conv'")
    return tuple(_DECLARED[kind])


def snapshot() -> dict[str, list[TypeSpec]]:
    return {kind: list(specs) for kind, specs in _DECLARED.items()}


def restore(saved: dict[str, list[TypeSpec]]) -> None:
    for kind, specs in saved.items():
        _DECLARED[kind][:] = specs


def _loaded(spec: TypeSpec) -> type | None:
    if isinstance(spec, type):
        return spec
    module_name, _, class_name = spec.rpartition(".")
    return loaded_type(module_name, class_name)


def norm_types() -> tuple[type, ...]:
    """The module classes counted as normalization layers: built-in, optional (only when already imported)
    and declared (a dotted name once its module is imported). Rules of kind "norm" are not types: see is_norm."""
    found = list(TORCH_NORMS)
    for module_name, names in OPTIONAL_NORMS.items():
        found += loaded_types(module_name, *names)
    found += [cls for cls in map(_loaded, _DECLARED["norm"]) if cls is not None]
    return tuple(dict.fromkeys(found))


def norm_types_in(model: nn.Module, rules: Sequence[Rule] | None = None) -> tuple[type, ...]:
    """:func:`norm_types` plus the classes of ``model``'s modules that :func:`is_norm` counts (for
    ``isinstance`` checks in one probe of ``model``)."""
    found = list(norm_types())
    for module in model.modules():
        if type(module) not in found and is_norm(module, rules):
            found.append(type(module))
    return tuple(found)


def _first_rule_kind(module: nn.Module, rules: Sequence[Rule] | None) -> str:
    rule = next((r for r in resolve(rules) if r.matches(module)), None)
    return rule.kind if rule is not None else ""


def is_norm(module: nn.Module, rules: Sequence[Rule] | None = None) -> bool:
    """True when ``module`` is a normalization layer (see the module docstring); ``rules`` are a call's own."""
    if isinstance(module, norm_types()) or matches_types(module, tuple(_DECLARED["norm"])):
        return True
    return _first_rule_kind(module, rules) == "norm"


def is_conv(module: nn.Module, rules: Sequence[Rule] | None = None) -> bool:
    """True when ``module`` is a convolution (see the module docstring); ``rules`` are a call's own."""
    if isinstance(module, _ConvNd) or matches_types(module, tuple(_DECLARED["conv"])):
        return True
    return _first_rule_kind(module, rules) == "conv"
