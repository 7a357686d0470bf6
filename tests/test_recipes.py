"""Every recipe of docs/recipes.md runs (issue 14, point 9).

A recipe is the ``bash`` and ``python`` blocks marked ``<!-- recipe: NAME -->``, run in document order in a
temporary directory that holds the input file the recipe starts from (random weights, the real layout of timm's
and torchvision's train.py checkpoints). ``wsconvert`` lines run through the CLI in this process (click's
CliRunner), python blocks in one fresh namespace.
"""

from __future__ import annotations

import argparse
import pickle
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner

import wsconvert
from wsconvert.cli import main

DOC = Path(__file__).parent.parent / "docs" / "recipes.md"
_BLOCK = re.compile(r"<!-- recipe: (\w+) -->\n```(bash|python)\n(.*?)```", re.S)
RECIPES = ("timm_resume", "torchvision_resume", "safe_globals", "onnx")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"),
]


def doc_blocks() -> dict[str, list[tuple[str, str]]]:
    """``{name: [(language, code), ...]}`` in document order."""
    blocks: dict[str, list[tuple[str, str]]] = {}
    for name, language, code in _BLOCK.findall(DOC.read_text(encoding="utf-8")):
        blocks.setdefault(name, []).append((language, code))
    return blocks


def run_recipe(name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": f"recipe_{name}"}
    for language, code in doc_blocks()[name]:
        if language == "python":
            exec(compile(code, f"docs/recipes.md:{name}", "exec"), namespace)
            continue
        for line in code.strip().splitlines():
            command = shlex.split(line)
            assert command[0] == "wsconvert", line
            result = CliRunner().invoke(main, command[1:], prog_name="wsconvert")
            assert result.exit_code == 0, result.output
    return namespace


def timm_train_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """What timm's train.py saves (CheckpointSaver): state_dict, arch, epoch, optimizer, version, args, metric."""
    model = timm.create_model("resnet18", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    args = argparse.Namespace(model="resnet18", num_classes=10, lr=0.1, epochs=100, batch_size=128)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"epoch": 4, "arch": "resnet18", "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(checkpoint | {"version": 2, "args": args, "metric": 12.5}, path)
    return model.state_dict()


def torchvision_references_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """What torchvision's references/classification/train.py saves with --model-ema."""
    model = torchvision.models.resnet18(num_classes=10)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.99))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30)
    args = argparse.Namespace(model="resnet18", lr=0.1, epochs=90, model_ema=True)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": 7,
            "args": args,
            "model_ema": ema.state_dict(),
        },
        path,
    )
    return model.state_dict()


def test_every_recipe_is_run_by_a_test() -> None:
    assert sorted(doc_blocks()) == sorted(RECIPES)


def assert_weights_from(model: torch.nn.Module, original: dict[str, torch.Tensor]) -> None:
    """The converted model holds the checkpoint's conv weights (as the parametrization's original)."""
    state = model.state_dict()
    torch.testing.assert_close(state["conv1.parametrizations.weight.original"], original["conv1.weight"])
    torch.testing.assert_close(state["fc.weight"], original["fc.weight"])


def test_timm_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    original = timm_train_checkpoint(tmp_path / "output/train/last.pth.tar")
    namespace = run_recipe("timm_resume")
    model = namespace["model"]
    assert wsconvert.is_standardized(model.conv1)
    assert namespace["start_epoch"] == 5
    assert torch.isfinite(namespace["loss"])
    assert namespace["optimizer"].state  # it trained a step with the new optimizer
    # what train.py --resume calls loads the same file strictly
    fresh = wsconvert.convert_model(timm.create_model("resnet18", num_classes=10), gn=32)
    assert timm.models.resume_checkpoint(fresh, "output/train/last-ws.pth.tar", log_info=False) == 5
    assert_weights_from(fresh, original)


def test_torchvision_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    original = torchvision_references_checkpoint(tmp_path / "checkpoint.pth")
    namespace = run_recipe("torchvision_resume")
    assert_weights_from(namespace["model"], original)
    assert_weights_from(namespace["ema"].module, original)
    assert namespace["start_epoch"] == 8


def test_safe_globals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    timm_train_checkpoint(tmp_path / "output/train/last.pth.tar")
    with pytest.raises(pickle.UnpicklingError, match="Namespace"):  # why the recipe needs safe_globals
        torch.load("output/train/last.pth.tar", weights_only=True)
    namespace = run_recipe("safe_globals")
    assert isinstance(namespace["checkpoint"]["args"], argparse.Namespace)
    assert capsys.readouterr().out == "resnet18 10\n"


def test_onnx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime", reason="needs the export extra: pip install 'wsconvert[export]'")
    monkeypatch.chdir(tmp_path)
    plain = torchvision.models.resnet18(num_classes=10)
    torch.save(plain.state_dict(), tmp_path / "model.pt")
    namespace = run_recipe("onnx")  # asserts onnxruntime's output equals the baked model's
    baked = namespace["baked"]
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in baked.modules())
    expected = wsconvert.bake(wsconvert.convert_model(plain, gn=32)).eval()
    x = namespace["x"]
    with torch.no_grad():
        torch.testing.assert_close(baked(x), expected(x))  # the CLI's --bake equals baking in Python
