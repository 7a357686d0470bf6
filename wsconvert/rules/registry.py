"""The rule registry: user rules consulted before the built-ins, globally or for one call.

Modelled on ``torch.ao.quantization.convert(mapping=...)`` (its ``get_default_*_mappings()`` return copies)
and Opacus' ``register_module_fixer`` (its own fixers are registered the same way). Order of consultation,
first match wins: a call's ``rules=[...]``, then ``register``ed rules (the last registered with
``first=True`` first), then the built-in table ``wsconvert.rules.builtin.RULES``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from ..errors import InvalidOptionError
from ..ws.detect import standardization
from . import builtin
from .base import Rule

__all__ = ["defaults", "is_standardized", "isolated", "register", "registered", "resolve", "unregister"]

_REGISTERED: list[Rule] = []


def _check_rule(rule: object, where: str) -> Rule:
    if not isinstance(rule, Rule):
        raise InvalidOptionError(
            f"{where}: {rule!r} ({type(rule).__name__}) is not a wsconvert.rules.Rule; build one with "
            "wsconvert.rules.already_standardized / standardize / replace_norm / keep, or Rule(...)"
        )
    return rule


def register(rule: Rule, *, first: bool = True) -> Rule:
    """Consult ``rule`` before the built-in rules in every conversion, plan and probe from now on.

    ``first=True`` puts it before the rules registered so far, ``first=False`` after them (both before the
    built-ins). Registering a rule that is already registered changes nothing. Returns ``rule``.
    """
    _check_rule(rule, "wsconvert.rules.register")
    if any(entry is rule for entry in _REGISTERED):
        return rule
    if first:
        _REGISTERED.insert(0, rule)
    else:
        _REGISTERED.append(rule)
    return rule


def unregister(rule: Rule) -> None:
    """Stop consulting ``rule`` (raises InvalidOptionError when it is not registered)."""
    for index, entry in enumerate(_REGISTERED):
        if entry is rule:
            del _REGISTERED[index]
            return
    name = rule.name if isinstance(rule, Rule) else repr(rule)
    raise InvalidOptionError(
        f"wsconvert.rules.unregister: rule {name!r} is not registered (wsconvert.rules.registered() lists them)"
    )


def registered() -> list[Rule]:
    """The globally registered rules, in the order they are consulted (a copy)."""
    return list(_REGISTERED)


def defaults() -> list[Rule]:
    """The built-in rules, in order (a copy: changing it changes nothing; pass it as ``rules=`` to reorder)."""
    return list(builtin.RULES)


def _scoped(rules: object) -> tuple[Rule, ...]:
    if rules is None:
        return ()
    if isinstance(rules, Rule):
        raise InvalidOptionError(f"rules={rules.name!r} is one Rule; pass a list of rules: rules=[rule]")
    if isinstance(rules, (str, bytes)) or not isinstance(rules, (Sequence, set, frozenset, tuple)):
        raise InvalidOptionError(
            f"rules={rules!r} ({type(rules).__name__}) must be a list of wsconvert.rules.Rule, e.g. "
            "rules=[wsconvert.rules.already_standardized(MyConv)]"
        )
    if isinstance(rules, (set, frozenset)):
        raise InvalidOptionError("rules= must be an ordered list (the first matching rule wins), not a set")
    return tuple(_check_rule(rule, f"rules[{index}]") for index, rule in enumerate(rules))


def resolve(rules: Sequence[Rule] | None = None) -> tuple[Rule, ...]:
    """The rules the walker consults, in order: ``rules`` (this call's), the registered ones, the built-ins.

    Raises InvalidOptionError naming the index and the value of an entry that is not a Rule.
    """
    return (*_scoped(rules), *_REGISTERED, *builtin.RULES)


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Within the block, ``register`` / ``unregister`` / ``declare_norm`` / ``declare_conv`` are undone on exit
    (for tests and for trying a rule out)."""
    from . import kinds

    saved_rules = list(_REGISTERED)
    saved_kinds = kinds.snapshot()
    try:
        yield
    finally:
        _REGISTERED[:] = saved_rules
        kinds.restore(saved_kinds)


def is_standardized(module: nn.Module, rules: Sequence[Rule] | None = None) -> bool:
    """True when ``module``'s weight is standardized at forward time.

    That is: its ``weight`` carries a :class:`~wsconvert.ws.standardize.WeightStandardization`
    parametrization, or a rule made by ``already_standardized`` matches it: built in, timm's StdConv2d /
    StdConv2dSame / ScaledStdConv2d / ScaledStdConv2dSame, transformers' BiT WeightStandardizedConv2d, mmcv's
    ConvWS2d / ConvAWS2d and lucidrains-style WeightStandardizedConv2d; or one registered or in ``rules``.
    """
    if standardization(module) is not None:
        return True
    return any(rule.standardized and rule.matches(module) for rule in resolve(rules))
