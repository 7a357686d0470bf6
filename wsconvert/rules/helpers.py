"""Rule helpers: a rule in one call. The built-in table (builtin.py) is written with these same helpers.

In the spirit of Opacus' ``register_module_fixer`` (its own fixers use the same decorator) and of
``torch.ao.quantization``'s mappings: what wsconvert does to a type is data a user can add to.

Each helper takes the module types it handles, as classes or dotted names ``"package.module.ClassName"``
(matched against the class's MRO, nothing imported), and/or ``match``, a predicate on the module; a module
matches when its type is one of ``types`` (if any are given) and ``match(module)`` is true (if given).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import InvalidOptionError
from ..norms import bcn as bcn_norm
from ..options import ConversionOptions
from .base import Decision, Rule, TypeMatcher, TypeSpec, type_name, type_specs
from .conv import decide_conv, skip, standardize_conv
from .norm import FALLBACK_NORM_EPS, group_norm, norm_decision

__all__ = ["already_standardized", "keep", "replace_norm", "standardize"]

Build = Callable[[nn.Module, Decision, ConversionOptions], nn.Module]

# What a conv needs for decide_conv / WeightStandardization.for_conv.
_CONV_ATTRIBUTES = ("in_channels", "out_channels", "groups")


def _matcher(helper: str, types: tuple[object, ...], match: Callable[[nn.Module], bool] | None) -> Callable:
    specs = type_specs(types, f"wsconvert.rules.{helper}")
    if match is not None and not callable(match):
        raise InvalidOptionError(f"wsconvert.rules.{helper}: match={match!r} is not callable (module -> bool)")
    if not specs and match is None:
        raise InvalidOptionError(
            f"wsconvert.rules.{helper}: give the module types it handles (classes or 'package.module.ClassName') "
            "and/or match=<predicate on the module>"
        )

    of_type = TypeMatcher(specs)

    def matches(module: nn.Module) -> bool:
        if specs and not of_type(module):
            return False
        return match is None or bool(match(module))

    return matches


def _default_name(prefix: str, types: tuple[object, ...]) -> str:
    shown = ", ".join(t.__name__ if isinstance(t, type) else str(t).rpartition(".")[2] for t in types)
    return f"{prefix} ({shown})" if shown else prefix


def _identity(module: nn.Module, decision: Decision, options: ConversionOptions) -> nn.Module:
    return module


def already_standardized(
    *types: TypeSpec,
    match: Callable[[nn.Module], bool] | None = None,
    name: str | None = None,
    reason: str | None = None,
) -> Rule:
    """A rule for convs that already standardize their weight in ``forward``: skipped, never standardized twice.

    The report gives ``reason`` (default ``"already weight-standardized (<ClassName>)"``), and
    ``wsconvert.is_standardized`` is True for them.
    """

    def decide(module: nn.Module, path: str, options: ConversionOptions) -> Decision:
        return skip(reason if reason is not None else f"already weight-standardized ({type_name(module)})")

    return Rule(
        name or _default_name("already standardized", types),
        _matcher("already_standardized", types, match),
        decide,
        _identity,
        kind="conv",
        standardized=True,
    )


def keep(
    *types: TypeSpec,
    reason: str,
    match: Callable[[nn.Module], bool] | None = None,
    name: str | None = None,
    kind: str = "",
) -> Rule:
    """A rule that leaves the matched modules as they are, listed in the report as skipped with ``reason``."""
    if not isinstance(reason, str) or not reason:
        raise InvalidOptionError(f"wsconvert.rules.keep: reason={reason!r} must say why the module is kept")
    return Rule(
        name or _default_name("kept", types),
        _matcher("keep", types, match),
        lambda module, path, options: skip(reason),
        _identity,
        kind=kind,
    )


def standardize(
    *types: TypeSpec,
    match: Callable[[nn.Module], bool] | None = None,
    name: str | None = None,
) -> Rule:
    """A rule that parametrizes the matched modules' ``weight`` with WS, like the built-in convolution rule.

    The module must look like a conv: ``weight`` a Parameter of shape (out, in/groups, *kernel) (a transposed
    conv says so with ``transposed = True``) and ``in_channels`` / ``out_channels`` / ``groups`` attributes;
    one that does not is skipped with a reason. Its forward must read ``self.weight``. A frozen weight
    (``requires_grad=False``) is skipped with the reason unless ``standardize_frozen=True``, as in the built-in rule.
    """

    def decide(module: nn.Module, path: str, options: ConversionOptions) -> Decision:
        missing = [attribute for attribute in _CONV_ATTRIBUTES if not isinstance(getattr(module, attribute, None), int)]
        if missing:
            return skip(
                f"{type_name(module)} has no integer {', '.join(missing)}: the standardize rule needs a conv-like "
                "module (weight of shape (out, in/groups, *kernel))"
            )
        return decide_conv(module, path, options)

    return Rule(
        name or _default_name("standardize", types),
        _matcher("standardize", types, match),
        decide,
        standardize_conv,
        kind="conv",
    )


def replace_norm(
    *types: TypeSpec,
    match: Callable[[nn.Module], bool] | None = None,
    build: Build | None = None,
    becomes: str = "GroupNorm",
    eps: float = FALLBACK_NORM_EPS,
    bcn: bool = False,
    name: str | None = None,
) -> Rule:
    """A rule that replaces BatchNorm-like layers by a GroupNorm, like the built-in BatchNorm rule.

    A matched layer holds per-channel ``weight`` / ``bias`` (parameters, buffers or None) and has
    ``num_features`` or a per-channel tensor to count its channels; the GroupNorm takes its affine, the
    groups ``gn`` asks for (or the largest divisor below), and its ``eps`` (``eps`` when it has none).
    ``build(module, decision, options)`` constructs something else instead (``decision.groups``,
    ``.channels``, ``.eps`` are planned); ``becomes`` names it in the report. ``bcn=True`` says the layer
    is a BatchNorm that ``norm="bcn"`` can turn into a BatchChannelNorm (wsconvert.norms.bcn: torch
    BatchNorm, torchvision/timm frozen BatchNorm); otherwise ``norm="bcn"`` keeps the layer with a reason.
    """
    if build is not None and not callable(build):
        raise InvalidOptionError(
            f"wsconvert.rules.replace_norm: build={build!r} is not callable (module, decision, options -> module)"
        )
    if not isinstance(becomes, str) or not becomes:
        raise InvalidOptionError(f"wsconvert.rules.replace_norm: becomes={becomes!r} must be a non-empty string")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise InvalidOptionError(f"wsconvert.rules.replace_norm: eps={eps!r} must be a positive number")
    default_eps = float(eps)

    def decide(module: nn.Module, path: str, options: ConversionOptions) -> Decision:
        if options.norm == "bcn":
            if not bcn:
                return skip(
                    f"norm='bcn' cannot build a BatchChannelNorm from a {type_name(module)} (it needs a BatchNorm's "
                    "state); convert with norm='gn', or give its rule a build="
                )
            target = becomes.replace("GroupNorm", "BatchChannelNorm")
            return bcn_norm.with_notes(norm_decision(module, path, options, target, default_eps), module, path, options)
        return norm_decision(module, path, options, becomes, default_eps)

    def apply(module: nn.Module, decision: Decision, options: ConversionOptions) -> nn.Module:
        if build is not None:
            return build(module, decision, options)
        if options.norm == "bcn":
            return bcn_norm.from_batchnorm(module, decision.groups, decision.eps, options.bcn_estimate)
        return group_norm(module, decision)

    return Rule(
        name or _default_name("replace norm", types), _matcher("replace_norm", types, match), decide, apply, kind="norm"
    )
