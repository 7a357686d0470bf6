"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})


def test_readme_options_table_lists_every_keyword_of_convert_model_and_plan_conversion():
    import inspect

    import wsconvert

    table = re.search(r"Options of `convert_model` / `plan_conversion`:\n\n(.*?)\n\n", README.read_text(), flags=re.S)
    assert table, "README.md has no options table"
    listed = set()
    for row in table.group(1).splitlines()[2:]:
        listed.update(re.findall(r"`(\w+)`", row.split("|")[1]))
    for function in (wsconvert.convert_model, wsconvert.plan_conversion):
        keywords = set(inspect.signature(function).parameters) - {"model"}
        assert keywords == listed, f"{function.__name__}: missing {keywords - listed}, extra {listed - keywords}"
