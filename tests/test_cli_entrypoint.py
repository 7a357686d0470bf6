"""The installed ``wsconvert`` console script and ``python -m wsconvert``, run as real subprocesses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torchvision

import wsconvert

SCRIPT = Path(sys.executable).parent / "wsconvert"


def _run(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_installed_entry_point_converts_and_fails_cleanly(tmp_path: Path) -> None:
    model = torchvision.models.resnet18(num_classes=10)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    ok = _run(SCRIPT, "model.pt", "--arch", "torchvision:resnet18", "--arch-kwargs", '{"num_classes": 10}',
              "--gn", "32", cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "Wrote model.ws.pt" in ok.stdout and ok.stderr == ""
    fresh = wsconvert.convert_model(torchvision.models.resnet18(num_classes=10), gn=32)
    fresh.load_state_dict(torch.load(tmp_path / "model.ws.pt", weights_only=True), strict=True)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), wsconvert.convert_model(model, gn=32).eval()(x), rtol=0, atol=0)

    # the same, correct, arguments again: refused for the existing output (a wrong --arch would be named first)
    again = _run(SCRIPT, "model.pt", "--arch", "torchvision:resnet18", "--arch-kwargs", '{"num_classes": 10}',
                 cwd=tmp_path)  # fmt: skip
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [again.stderr.strip()] and "already exists" in again.stderr
    assert "Traceback" not in again.stderr

    usage = _run(SCRIPT, "model.pt", "--gn", "0", cwd=tmp_path)
    assert usage.returncode == 2 and "--gn" in usage.stderr


def test_python_dash_m(tmp_path: Path) -> None:
    help_text = _run(sys.executable, "-m", "wsconvert", "--help", cwd=tmp_path)
    assert help_text.returncode == 0 and help_text.stdout.startswith("Usage: wsconvert [OPTIONS] INPUT")
    version = _run(sys.executable, "-m", "wsconvert", "--version", cwd=tmp_path)
    assert version.returncode == 0 and wsconvert.__version__ in version.stdout
    missing = _run(sys.executable, "-m", "wsconvert", "nothing.pt", cwd=tmp_path)
    assert missing.returncode == 1 and missing.stderr.strip() == "Error: nothing.pt: no such file"
