"""The rules: which module types wsconvert converts, what each becomes, and how a user adds rules.

``register(rule)`` adds a rule for every conversion, ``convert_model(..., rules=[...])`` for one call; user
rules are consulted before the built-ins (``defaults()``, a copy). A rule is one call of a helper:
``already_standardized(...)``, ``standardize(...)``, ``replace_norm(...)``, ``keep(...)``; or a ``Rule``
written by hand. ``declare_norm`` / ``declare_conv`` tell the unnormalized-conv probe about a type. See
docs/api.md, "Extending wsconvert".
"""

from __future__ import annotations

from .base import Decision, Rule, TypeSpec, choose_groups, type_name
from .builtin import RULES
from .helpers import already_standardized, keep, replace_norm, standardize
from .kinds import declare_conv, declare_norm, declared, is_conv, is_norm, norm_types, undeclare
from .registry import defaults, is_standardized, isolated, register, registered, resolve, unregister

__all__ = [
    "Decision",
    "Rule",
    "RULES",
    "TypeSpec",
    "already_standardized",
    "choose_groups",
    "declare_conv",
    "declare_norm",
    "declared",
    "defaults",
    "is_conv",
    "is_norm",
    "is_standardized",
    "isolated",
    "keep",
    "norm_types",
    "register",
    "registered",
    "replace_norm",
    "resolve",
    "standardize",
    "type_name",
    "undeclare",
    "unregister",
]
