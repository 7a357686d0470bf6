"""The rules: which module types wsconvert converts, what each becomes (see wsconvert.rules.builtin)."""

from __future__ import annotations

from .builtin import RULES, Decision, Rule, choose_groups, is_standardized, type_name

__all__ = ["Decision", "Rule", "RULES", "choose_groups", "is_standardized", "type_name"]
