"""The examples of docs/api.md's "Extending wsconvert" section run as written, in order, as one script."""

from __future__ import annotations

import re
from pathlib import Path

from wsconvert import rules

API = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def _section() -> str:
    text = API.read_text()
    match = re.search(r"^## Extending wsconvert\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, "docs/api.md has no 'Extending wsconvert' section"
    return match.group(1)


def test_extending_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", _section(), flags=re.S)
    assert len(blocks) >= 4, "the Extending wsconvert section lost its examples"
    namespace = {"__name__": "extending_docs"}
    with rules.isolated():  # the examples register and declare: leave the registry as it was
        for block in blocks:
            exec(compile(block, str(API), "exec"), namespace)
    assert rules.registered() == [] and rules.declared("norm") == ()


def test_extending_section_names_every_public_rules_helper():
    section = _section()
    for name in ("register", "unregister", "registered", "defaults", "resolve", "isolated", "already_standardized",
                 "standardize", "replace_norm", "keep", "declare_norm", "declare_conv", "undeclare", "is_norm",
                 "is_conv", "Rule", "Decision"):  # fmt: skip
        assert f"{name}(" in section or f"`{name}`" in section, f"docs/api.md Extending wsconvert does not show {name}"
