"""The shell-completion recipe of the README works with the installed console script (click's completion)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "wsconvert"


def _complete(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT)], cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def test_bash_source_prints_a_completion_function(tmp_path: Path) -> None:
    done = _complete(tmp_path, _WSCONVERT_COMPLETE="bash_source")
    assert done.returncode == 0, done.stderr
    assert "_wsconvert_completion()" in done.stdout and "complete " in done.stdout


@pytest.mark.parametrize(("words", "expected"), [("wsconvert --sty", "--style"), ("wsconvert --style ", "paper")])
def test_bash_completes_options_and_choices(tmp_path: Path, words: str, expected: str) -> None:
    cword = str(len(words.split()) - (0 if words.endswith(" ") else 1))
    done = _complete(tmp_path, _WSCONVERT_COMPLETE="bash_complete", COMP_WORDS=words, COMP_CWORD=cword)
    assert done.returncode == 0, done.stderr
    values = [line.split(",", 1)[1] for line in done.stdout.splitlines()]  # click's bash format: "type,value"
    assert expected in values, done.stdout
