"""What a rule is (``Rule``, ``Decision``) and how a rule names module types (classes or dotted names).

A type given to a rule helper or to ``declare_norm`` / ``declare_conv`` is a class, or the dotted name
``"package.module.ClassName"`` of one. A dotted name is compared with ``__module__ + "." + __qualname__`` of
every class in the module's MRO, so a subclass matches too and nothing is imported: a model can only hold
an instance of a class whose module is already imported (the same reasoning as ``wsconvert._optional``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize

from ..errors import InvalidOptionError
from ..options import ConversionOptions

__all__ = [
    "ACTIONS",
    "KINDS",
    "Decision",
    "Rule",
    "TypeMatcher",
    "TypeSpec",
    "choose_groups",
    "dotted_name",
    "matches_types",
    "type_name",
    "type_specs",
]

ACTIONS = ("standardize", "replace", "skip")
KINDS = ("", "conv", "norm")

TypeSpec = type | str
"""A module class, or its dotted name ``"package.module.ClassName"`` (matched without importing)."""


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

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise InvalidOptionError(f"Decision(action={self.action!r}): the action must be one of {list(ACTIONS)}")


@dataclass(frozen=True)
class Rule:
    """One entry of the rules table. ``apply`` returns the module to place: the same one for in-place changes.

    ``matches(module)`` says whether the rule handles a module, ``decide(module, path, options)`` returns a
    :class:`Decision` without changing anything, ``apply(module, decision, options)`` carries it out.
    ``kind`` tells the probes what a matched module is: ``"conv"`` (its output scale is what WS fixes),
    ``"norm"`` (a normalization layer) or ``""`` (neither). ``standardized`` says the matched modules already
    standardize their weight at forward time (``wsconvert.is_standardized`` is then True for them).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    decide: Callable[[nn.Module, str, ConversionOptions], Decision]
    apply: Callable[[nn.Module, Decision, ConversionOptions], nn.Module]
    kind: str = ""
    standardized: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidOptionError(f"Rule(name={self.name!r}): the name must be a non-empty string")
        for field_name in ("matches", "decide", "apply"):
            value = getattr(self, field_name)
            if not callable(value):
                raise InvalidOptionError(
                    f"Rule {self.name!r}: {field_name}={value!r} is not callable; see the Rule docstring for its "
                    "signature"
                )
        if self.kind not in KINDS:
            raise InvalidOptionError(f"Rule {self.name!r}: kind={self.kind!r} must be one of {list(KINDS)}")


def type_name(module: nn.Module) -> str:
    """The module's class name as the user wrote it (not parametrize's ``ParametrizedConv2d``)."""
    return parametrize.type_before_parametrizations(module).__name__


def dotted_name(cls: type) -> str:
    """``cls.__module__ + "." + cls.__qualname__``, the form a dotted type name is compared with."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_spec(value: object, where: str) -> TypeSpec:
    if isinstance(value, type):
        return value
    if isinstance(value, str):
        parts = value.split(".")
        if len(parts) >= 2 and all(part.isidentifier() for part in parts):
            return value
        raise InvalidOptionError(
            f"{where}: {value!r} is not a dotted class name; write it as 'package.module.ClassName' "
            "(e.g. 'transformers.models.detr.modeling_detr.DetrFrozenBatchNorm2d') or pass the class"
        )
    raise InvalidOptionError(
        f"{where}: {value!r} ({type(value).__name__}) is neither a class nor a dotted class name "
        "'package.module.ClassName'"
    )


def type_specs(types: Iterable[object], where: str) -> tuple[TypeSpec, ...]:
    """``types`` checked: each a class or a dotted class name (InvalidOptionError naming ``where`` otherwise)."""
    return tuple(_check_spec(value, where) for value in types)


class TypeMatcher:
    """``specs`` split once into classes (``issubclass``) and dotted names (compared along the MRO)."""

    __slots__ = ("classes", "names")

    def __init__(self, specs: tuple[TypeSpec, ...]) -> None:
        self.classes = tuple(spec for spec in specs if isinstance(spec, type))
        self.names = frozenset(spec for spec in specs if isinstance(spec, str))

    def __call__(self, module: nn.Module) -> bool:
        cls = parametrize.type_before_parametrizations(module)
        if self.classes and issubclass(cls, self.classes):
            return True
        return bool(self.names) and any(dotted_name(base) in self.names for base in cls.__mro__)


def matches_types(module: nn.Module, specs: tuple[TypeSpec, ...]) -> bool:
    """True when ``module``'s class (before parametrizations) is, or derives from, one of ``specs``."""
    return bool(specs) and TypeMatcher(specs)(module)


def choose_groups(channels: int, requested: int) -> int:
    """``requested`` when it divides ``channels``, else the largest divisor of ``channels`` below it."""
    for groups in range(min(requested, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1
