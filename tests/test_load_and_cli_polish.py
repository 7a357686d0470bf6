"""issue 14 points 3, 5, 6: wsconvert.load for every output, validation before "pass --force", dry-run refusals,
progress drawn once per percentage, Ctrl-C during the torch import, and the lazy ``import wsconvert``."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file
from torch import nn

import wsconvert
from wsconvert.checkpoint import reader as ckpt
from wsconvert.checkpoint.arch import resolve_arch
from wsconvert.cli import _Progress, main

torch.set_num_threads(1)
RESNET = ["--arch", "torchvision:resnet18", "--arch-kwargs", '{"num_classes": 10}']


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="wsconvert")


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def randomized(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so that a wrong or missing load shows in the outputs."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model


def resnet() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def mobilenet() -> nn.Module:
    return timm.create_model("mobilenetv3_small_050", num_classes=10)


def _raw(tmp: Path) -> tuple[Path, list[str], Callable[[], nn.Module]]:
    torch.save(randomized(resnet()).state_dict(), tmp / "raw.pt")
    return tmp / "raw.pt", RESNET, resnet


def _timm_train(tmp: Path) -> tuple[Path, list[str], Callable[[], nn.Module]]:
    checkpoint = {
        "epoch": 3,
        "arch": "mobilenetv3_small_050",
        "state_dict": randomized(mobilenet()).state_dict(),
        "state_dict_ema": randomized(mobilenet()).state_dict(),
        "args": argparse.Namespace(model="mobilenetv3_small_050", num_classes=10),
    }
    torch.save(checkpoint, tmp / "last.pth.tar")
    return tmp / "last.pth.tar", [], mobilenet


def _safetensors(tmp: Path) -> tuple[Path, list[str], Callable[[], nn.Module]]:
    save_file(dict(randomized(resnet()).state_dict()), tmp / "m.safetensors")
    return tmp / "m.safetensors", RESNET, resnet


def _file_state_dict(path: Path, entry: str = "state_dict") -> dict:
    if path.suffix == ".safetensors":
        return load_file(path)
    obj = ckpt.load_checkpoint(path).obj
    return obj[entry] if ckpt.INFO_KEY in obj else obj


CASES = [
    ("raw", _raw, ["--gn", "32"], {"gn": 32}),
    ("timm-train", _timm_train, ["--gn", "32"], {"gn": 32}),
    ("safetensors", _safetensors, ["--gn", "32"], {"gn": 32}),
    ("raw-preserve", _raw, ["--gn", "8", "--preserve"], {"gn": 8, "preserve": True}),
    ("safetensors-bcn", _safetensors, ["--gn", "8", "--norm", "bcn"], {"gn": 8, "norm": "bcn"}),
]


@pytest.mark.parametrize(("make", "flags", "options"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_load_rebuilds_every_output_layout(tmp_path: Path, make: Callable, flags: list, options: dict) -> None:
    source, args, arch = make(tmp_path)
    output = tmp_path / f"out{source.suffix}"
    assert_ok(run(source, *args, *flags, "-o", output))
    loaded = wsconvert.load(output)
    expected = wsconvert.convert_model(arch(), **options)
    expected.load_state_dict(_file_state_dict(output), strict=True)
    assert str(loaded) == str(expected)
    torch.testing.assert_close(loaded.state_dict(), expected.state_dict(), rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), expected.eval()(x))
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_load_picks_the_main_entry_not_the_ema_copy_and_entry_picks_another(tmp_path: Path) -> None:
    source, _, _ = _timm_train(tmp_path)
    assert_ok(run(source, "--gn", "8", "-o", tmp_path / "out.pt"))
    x = torch.randn(2, 3, 32, 32)
    for entry in ("state_dict", "state_dict_ema"):
        expected = wsconvert.convert_model(mobilenet(), gn=8)
        expected.load_state_dict(_file_state_dict(tmp_path / "out.pt", entry), strict=True)
        loaded = wsconvert.load(tmp_path / "out.pt", **({} if entry == "state_dict" else {"entry": entry}))
        torch.testing.assert_close(loaded.eval()(x), expected.eval()(x), rtol=0, atol=0)
    with pytest.raises(wsconvert.CheckpointError, match="no rewritten model entry 'optimizer'.*'state_dict'"):
        wsconvert.load(tmp_path / "out.pt", entry="optimizer")


def test_load_map_location(tmp_path: Path) -> None:
    source, args, _ = _raw(tmp_path)
    assert_ok(run(source, *args, "-o", tmp_path / "out.pt"))
    model = wsconvert.load(tmp_path / "out.pt", map_location=torch.device("meta"))
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(wsconvert.InvalidOptionError, match="map_location"):
        wsconvert.load(tmp_path / "out.pt", map_location=lambda storage, location: storage)


def _edit_record(path: Path, **changes: object) -> None:
    state_dict = torch.load(path, weights_only=True)
    state_dict._metadata[ckpt.METADATA_INFO_KEY].update(changes)
    torch.save(state_dict, path)


def test_load_errors(tmp_path: Path) -> None:
    torch.save(resnet().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(wsconvert.CheckpointError, match="not written by wsconvert.*convert_model.*load_state_dict"):
        wsconvert.load(tmp_path / "plain.pt")

    source, args, _ = _raw(tmp_path)
    assert_ok(run(source, *args, "--gn", "8", "-o", tmp_path / "out.pt"))
    _edit_record(tmp_path / "out.pt", arch="no_such_package_ws.models:build")
    with pytest.raises(wsconvert.ArchitectureError, match="no_such_package_ws.models:build.*cannot import"):
        wsconvert.load(tmp_path / "out.pt")

    assert_ok(run(source, *args, "--gn", "8", "--bake", "-o", tmp_path / "baked.pt"))
    with pytest.raises(wsconvert.CheckpointError, match="--bake output"):
        wsconvert.load(tmp_path / "baked.pt")


def test_load_runs_no_pickled_code_from_a_state_dict_output(tmp_path: Path) -> None:
    """A state-dict output with a pickled object added is refused by the safe loader's allowlist, or loaded
    without running it; wsconvert.load reads tensor files with the project's reader."""
    source, args, _ = _raw(tmp_path)
    assert_ok(run(source, *args, "-o", tmp_path / "out.pt"))
    calls: list[object] = []
    original = ckpt.load_checkpoint

    def spy(path: object, **kwargs: object) -> ckpt.Loaded:
        calls.append(path)
        return original(path, **kwargs)

    import wsconvert.checkpoint.wholemodel as wholemodel

    wholemodel.ckpt.load_checkpoint = spy  # type: ignore[assignment]
    try:
        wsconvert.load(tmp_path / "out.pt")
    finally:
        wholemodel.ckpt.load_checkpoint = original  # type: ignore[assignment]
    assert calls == [tmp_path / "out.pt"]


# --- point 6: validation before "output exists", family typos ------------------------------------------------


@pytest.mark.parametrize(
    ("arch_args", "message"),
    [
        (["--arch", "torchvision:resnet18", "--arch-kwargs", '{"num_classes": 5}'], "num_classes"),
        (["--arch", "tim:resnet18"], "did you mean timm:resnet18"),
    ],
    ids=["num_classes", "family-typo"],
)
def test_architecture_mistake_is_reported_before_existing_output(tmp_path: Path, arch_args: list, message: str) -> None:
    source, _, _ = _raw(tmp_path)
    (tmp_path / "raw.ws.pt").write_bytes(b"keep me")
    result = run(source, *arch_args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert message in result.stderr and "already exists" not in result.stderr, result.stderr
    assert (tmp_path / "raw.ws.pt").read_bytes() == b"keep me"
    refused = run(source, *RESNET)  # a correct --arch still refuses the existing output
    assert refused.exit_code == 1 and "already exists; pass --force" in refused.stderr


@pytest.mark.parametrize(
    ("spec", "suggestion"),
    [
        ("tim:resnet18", "did you mean timm:resnet18?"),
        ("torchvison:resnet18", "did you mean torchvision:resnet18?"),
        ("Timm:resnet18", "did you mean timm:resnet18?"),
        ("resnet18", "did you mean torchvision:resnet18 or timm:resnet18?"),
        ("vit_tiny_patch16_224", "did you mean timm:vit_tiny_patch16_224?"),
        ("torchvison:not_a_model_anywhere", None),
        ("collections:OrderedDict", None),
    ],
)
def test_family_typo_suggestions(spec: str, suggestion: str | None) -> None:
    if suggestion is None:
        try:
            resolve_arch(spec)
        except wsconvert.ArchitectureError as error:
            assert "did you mean" not in str(error)
        return
    with pytest.raises(wsconvert.ArchitectureError, match=suggestion.replace("?", r"\?")):
        resolve_arch(spec)


# --- point 3: dry run, progress, Ctrl-C during imports, lazy import ------------------------------------------


def test_dry_run_says_the_real_run_would_refuse(tmp_path: Path) -> None:
    source, args, _ = _raw(tmp_path)
    (tmp_path / "raw.ws.pt").write_bytes(b"keep me")
    result = run(source, *args, "--dry-run")
    assert_ok(result)  # a dry run reports; its exit code stays 0 (docs/cli.md)
    assert "the real run would refuse: output" in result.stdout and "already exists" in result.stdout
    assert "would write" not in result.stdout
    report = run(source, *args, "--dry-run", "--json")
    assert "already exists" in __import__("json").loads(report.stdout)["would_refuse"]
    forced = run(source, *args, "--dry-run", "--force", "--json")
    assert __import__("json").loads(forced.stdout)["would_refuse"] is None
    assert (tmp_path / "raw.ws.pt").read_bytes() == b"keep me"


def test_progress_draws_each_percentage_once(capsys: pytest.CaptureFixture) -> None:
    progress = _Progress(True)
    total = 1000
    for done in [0, 5, 10, 10, 500, 999, 1000, 1000, 1000, 1000]:
        progress.bytes(done, total)
    progress.done()
    drawn = capsys.readouterr().err
    # click strips the erase-line code when stderr is not a terminal; every redraw still starts with \r
    lines = [line for line in drawn.split("\r") if line]
    percents = [line.split("%")[0].rsplit("(", 1)[1] for line in lines if "%)" in line]
    assert percents == ["0", "1", "50", "99", "100"]
    assert lines[-1].startswith("done in") and "(100%)" in lines[-2]


def test_progress_of_a_real_write_shows_100_percent_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, args, _ = _raw(tmp_path)
    monkeypatch.setattr("wsconvert.cli._stderr_is_terminal", lambda: True)
    result = run(source, *args, "-o", tmp_path / "out.pt")
    assert_ok(result)
    assert result.stderr.count("(100%)") == 1 and "done in" in result.stderr.split("(100%)")[1]


_SLOW_TORCH_IMPORT = """
import os, sys, time
class _SlowTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and os.environ.get("WS_READY_FILE"):
            open(os.environ.pop("WS_READY_FILE"), "w").close()
            time.sleep(60)
        return None
sys.meta_path.insert(0, _SlowTorch())
"""


@pytest.mark.parametrize("how", ["python -m wsconvert", "console script"])
def test_ctrl_c_during_the_torch_import_is_aborted(tmp_path: Path, how: str) -> None:
    """SIGINT while torch is being imported (held there by a sitecustomize import hook) is ``Aborted!``, exit 1."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_SLOW_TORCH_IMPORT)
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "WS_READY_FILE": str(ready)}
    script = Path(sys.executable).parent / "wsconvert"
    command = [sys.executable, "-m", "wsconvert"] if how.startswith("python") else [str(script)]
    process = subprocess.Popen([*command, "model.pt", "--arch", "torchvision:resnet18"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), process.communicate(timeout=30)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1, stderr
    assert stderr.strip() == "Aborted!" and "Traceback" not in stderr and stdout == ""


def test_import_wsconvert_is_lazy_and_every_public_name_works() -> None:
    code = (
        "import sys, wsconvert, wsconvert.cli; assert 'torch' not in sys.modules, 'torch imported';"
        "names = [getattr(wsconvert, n) for n in wsconvert.__all__];"
        "from wsconvert import convert_model, load, WSConvertError, __version__;"
        "assert convert_model is wsconvert.convert_model and issubclass(WSConvertError, ValueError);"
        "import wsconvert.checkpoint; assert wsconvert.rules.is_standardized is wsconvert.is_standardized;"
        "print(len(names))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(wsconvert.__all__))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        wsconvert.no_such_name  # noqa: B018
