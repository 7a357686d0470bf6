"""The README's command-line section: real examples and the exact ``wsconvert --help`` text, kept in sync.

Regenerate the section after changing the command: ``.venv/bin/python tests/test_cli_readme.py``.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from click.testing import CliRunner

from wsconvert.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- cli-help:start -->", "<!-- cli-help:end -->"

EXAMPLES = """\
`wsconvert` rewrites a saved checkpoint so that it loads, with `strict=True`, into
`convert_model(arch(), same options)` and computes what converting in Python computes. The output keeps the
input's layout (raw state dict, training checkpoint with its other entries, safetensors, key prefixes such
as `module.` / `_orig_mod.` / Lightning's `model.`), records the options and the wsconvert version, and drops
optimizer and scheduler state (it no longer lines up with the converted parameters; the report says so).
Files are loaded with `torch.load(weights_only=True, mmap=True)` and written atomically.

```bash
# a raw state dict needs its architecture (built with random weights, nothing is downloaded)
wsconvert resnet18.pt --arch torchvision:resnet18 --gn 32             # writes resnet18.ws.pt
# constructor keyword arguments as JSON, an explicit output name
wsconvert finetuned.pt --arch timm:resnet50 --arch-kwargs '{"num_classes": 10}' --gn 32 -o resnet50-ws.pt
# timm train.py and torchvision-references checkpoints name their architecture; EMA copies are rewritten too
wsconvert output/train/last.pth.tar --gn 32
# Lightning checkpoints: the attribute prefix is found and kept
wsconvert lightning_logs/version_0/checkpoints/last.ckpt --arch torchvision:resnet50 --gn 32
# safetensors stay safetensors; the options go into the file's metadata
wsconvert model.safetensors --arch timm:resnet50 --exclude 'fc' --gn 32
# plan only, as JSON, nothing written
wsconvert resnet18.pt --arch torchvision:resnet18 --gn 32 --dry-run --json
# for inference and export: standardized weights baked into plain conv weights
wsconvert resnet18.pt --arch torchvision:resnet18 --gn 32 --bake -o resnet18-baked.pt
# a whole pickled model (torch.save(model)) runs code when loaded: opt in; read it back with wsconvert.load(path)
wsconvert whole_model.pt --trust-pickle --gn 32
```

Load a converted state dict with
`wsconvert.convert_model(torchvision.models.resnet18(), gn=32).load_state_dict(torch.load("resnet18.ws.pt"))`.
More in [docs/cli.md](docs/cli.md): layouts, safety, exit codes, large files.
"""


def help_text() -> str:
    result = CliRunner().invoke(main, ["--help"], prog_name="wsconvert")
    assert result.exit_code == 0, result.output
    return result.stdout


def section() -> str:
    return f"{START}\n{EXAMPLES}\n`wsconvert --help`:\n\n```text\n{help_text()}```\n{END}"


def _current() -> str:
    text = README.read_text()
    match = re.search(re.escape(START) + ".*?" + re.escape(END), text, flags=re.S)
    assert match, f"README.md lacks the {START} ... {END} markers"
    return match.group(0)


def test_readme_cli_section_is_current() -> None:
    assert _current() == section(), (
        "README's command-line section is stale: run .venv/bin/python tests/test_cli_readme.py"
    )


def test_readme_examples_parse_with_the_real_command() -> None:
    commands = [line for line in EXAMPLES.splitlines() if line.startswith("wsconvert ")]
    assert len(commands) >= 6
    for line in commands:
        args = shlex.split(line, comments=True)[1:]
        with main.make_context("wsconvert", args) as ctx:  # parses and validates every option value
            assert ctx.params["input"]


def test_help_is_the_same_in_any_terminal(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    narrow = help_text()
    monkeypatch.setenv("COLUMNS", "200")
    assert narrow == help_text()


if __name__ == "__main__":
    text = README.read_text()
    README.write_text(text.replace(_current(), section()))
    print(f"updated {README}", file=sys.stderr)
