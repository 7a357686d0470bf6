"""The ``wsconvert`` command: every input layout, every bad input, and the flags (CliRunner, in process)."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import wsconvert
from wsconvert.checkpoint import reader as ckpt
from wsconvert.cli import main

RESNET_ARGS = ["--arch", "torchvision:resnet18", "--arch-kwargs", '{"num_classes": 10}']


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="wsconvert")


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def assert_one_line_error(result: Result, message: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0], lines[0]
    assert result.stdout == ""


def randomize_running_stats(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def resnet() -> nn.Module:
    return randomize_running_stats(torchvision.models.resnet18(num_classes=10))


def timm_model() -> nn.Module:
    return randomize_running_stats(timm.create_model("mobilenetv3_small_050", num_classes=10))


def prefixed(state_dict: dict, prefix: str) -> OrderedDict:
    return OrderedDict((prefix + k, v) for k, v in state_dict.items())


def strip(state_dict: dict, prefix: str) -> OrderedDict:
    return OrderedDict((k[len(prefix) :], v) for k, v in state_dict.items() if k.startswith(prefix))


def optimizer_state(model: nn.Module) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def scheduler_state(model: nn.Module) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return torch.optim.lr_scheduler.StepLR(optimizer, 10).state_dict()


@dataclass
class Layout:
    """A saved input: its file, the extra command-line args, the model it came from, where its state dicts are."""

    path: Path
    args: list[str]
    model: nn.Module
    build: Callable[[], nn.Module]
    state_dicts: Callable[[object], list[dict]]  # output object -> the model state dicts in it (prefixes stripped)
    kept: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()


def _raw(tmp: Path, prefix: str) -> Layout:
    model = resnet()
    torch.save(prefixed(model.state_dict(), prefix), tmp / "raw.pt")
    return Layout(tmp / "raw.pt", RESNET_ARGS, model, lambda: torchvision.models.resnet18(num_classes=10),
                  lambda out: [strip(out, prefix)])  # fmt: skip


def _timm_train(tmp: Path) -> Layout:
    model = timm_model()
    ema = timm_model()
    checkpoint = {
        "epoch": 7,
        "arch": "mobilenetv3_small_050",
        "state_dict": model.state_dict(),
        "optimizer": optimizer_state(timm_model()),
        "args": argparse.Namespace(model="mobilenetv3_small_050", num_classes=10, lr=0.1, batch_size=2),
        "amp_scaler": {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000},
        "version": 2,
        "metric": 71.5,
        "state_dict_ema": ema.state_dict(),
    }
    torch.save(checkpoint, tmp / "last.pth.tar")
    return Layout(
        tmp / "last.pth.tar", [], model, lambda: timm.create_model("mobilenetv3_small_050", num_classes=10),
        lambda out: [out["state_dict"], out["state_dict_ema"]],
        kept=("epoch", "arch", "args", "amp_scaler", "version", "metric"), dropped=("optimizer",),
    )  # fmt: skip


def _torchvision_references(tmp: Path) -> Layout:
    model = resnet()
    model_ema = torch.optim.swa_utils.AveragedModel(model)
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer_state(resnet()),
        "lr_scheduler": scheduler_state(resnet()),
        "epoch": 3,
        "args": argparse.Namespace(model="resnet18", lr=0.1, epochs=90, weights=None),
        "model_ema": model_ema.state_dict(),
        "scaler": {"scale": 65536.0},
    }
    torch.save(checkpoint, tmp / "checkpoint.pth")
    return Layout(
        tmp / "checkpoint.pth", ["--arch-kwargs", '{"num_classes": 10}'], model,
        lambda: torchvision.models.resnet18(num_classes=10),
        lambda out: [out["model"], strip(out["model_ema"], "module.")],
        kept=("epoch", "args", "scaler"), dropped=("optimizer", "lr_scheduler"),
    )  # fmt: skip


def _lightning(tmp: Path) -> Layout:
    model = resnet()
    state_dict = prefixed(model.state_dict(), "model.")
    state_dict["criterion.pos_weight"] = torch.ones(3)  # another LightningModule attribute, kept as is
    checkpoint = {
        "epoch": 2,
        "global_step": 400,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None, "best_model_path": ""}},
        "optimizer_states": [optimizer_state(resnet())],
        "lr_schedulers": [scheduler_state(resnet())],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1, "num_classes": 10},
    }
    torch.save(checkpoint, tmp / "last.ckpt")
    return Layout(
        tmp / "last.ckpt", RESNET_ARGS, model, lambda: torchvision.models.resnet18(num_classes=10),
        lambda out: [strip(out["state_dict"], "model.")],
        kept=("epoch", "global_step", "pytorch-lightning_version", "loops", "callbacks", "hparams_name",
              "hyper_parameters"),
        dropped=("optimizer_states", "lr_schedulers"),
    )  # fmt: skip


def _safetensors(tmp: Path) -> Layout:
    model = resnet()
    save_file(dict(model.state_dict()), tmp / "model.safetensors", metadata={"format": "pt"})
    return Layout(tmp / "model.safetensors", RESNET_ARGS, model, lambda: torchvision.models.resnet18(num_classes=10),
                  lambda out: [out])  # fmt: skip


def _legacy(tmp: Path) -> Layout:
    model = resnet()
    torch.save(model.state_dict(), tmp / "legacy.pth", _use_new_zipfile_serialization=False)  # pre-1.6 format
    return Layout(tmp / "legacy.pth", RESNET_ARGS, model, lambda: torchvision.models.resnet18(num_classes=10),
                  lambda out: [out])  # fmt: skip


LAYOUTS: dict[str, Callable[[Path], Layout]] = {
    "raw": lambda tmp: _raw(tmp, ""),
    "ddp": lambda tmp: _raw(tmp, "module."),
    "compile": lambda tmp: _raw(tmp, "_orig_mod."),
    "ddp+compile": lambda tmp: _raw(tmp, "module._orig_mod."),
    "timm train.py": _timm_train,
    "torchvision references": _torchvision_references,
    "lightning": _lightning,
    "safetensors": _safetensors,
    "legacy torch.save format": _legacy,
}


def read_output(path: Path) -> object:
    if ckpt.sniff(path) == "safetensors":
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    with torch.serialization.safe_globals([argparse.Namespace]):  # the outputs need no more than the inputs
        return torch.load(path, weights_only=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_as_python(layout: Layout, out: object, options: dict, bake: bool = False) -> None:
    """Every rewritten state dict loads strictly into convert_model(arch(), options) and computes the same."""
    expected = wsconvert.convert_model(layout.model, **options)
    if bake:
        expected = wsconvert.bake(expected)
    x = torch.randn(2, 3, 32, 32)
    reference = expected.eval()(x)
    for state_dict in layout.state_dicts(out)[:1]:
        fresh = wsconvert.convert_model(layout.build(), **options)
        if bake:
            fresh = wsconvert.bake(fresh)
        fresh.load_state_dict(state_dict, strict=True)
        torch.testing.assert_close(fresh.eval()(x), reference, rtol=0, atol=0)
    for state_dict in layout.state_dicts(out)[1:]:  # EMA copies: strict loading is the contract
        fresh = wsconvert.convert_model(layout.build(), **options)
        fresh.load_state_dict(state_dict, strict=True)


# --- every input layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_converts_like_python(tmp_path: Path, name: str) -> None:
    layout = LAYOUTS[name](tmp_path)
    before = sha256(layout.path)
    result = run(layout.path, *layout.args, "--gn", 8)
    assert_ok(result)
    output = ckpt.default_output_path(layout.path)
    assert output.exists() and sha256(layout.path) == before  # the input is never modified
    out = read_output(output)
    assert_same_as_python(layout, out, {"gn": 8})
    if isinstance(out, dict) and "wsconvert" in out:  # training checkpoints keep their other entries
        original = ckpt.load_checkpoint(layout.path).obj
        assert set(out) == (set(original) - set(layout.dropped)) | {"wsconvert"}
        for key in layout.kept:
            assert key in out and key in result.stdout
        for key in layout.dropped:
            assert key not in out and f"dropped: {key!r}" in result.stdout
        assert out["wsconvert"]["options"]["gn"] == 8 and out["wsconvert"]["dropped"] == list(layout.dropped)
    assert "weight-standardized" in result.stdout and f"Wrote {output}" in result.stdout


def test_training_checkpoint_keeps_values(tmp_path: Path) -> None:
    layout = _timm_train(tmp_path)
    assert_ok(run(layout.path, "--gn", 8))
    out = read_output(ckpt.default_output_path(layout.path))
    assert out["epoch"] == 7 and out["metric"] == 71.5 and out["args"].num_classes == 10
    assert list(out) == ["epoch", "arch", "state_dict", "args", "amp_scaler", "version", "metric",
                         "state_dict_ema", "wsconvert"]  # fmt: skip
    assert (
        "architecture timm:mobilenetv3_small_050 taken from the checkpoint"
        in run(layout.path, "--gn", 8, "--dry-run").stdout
    )


def test_ema_of_averaged_model_keeps_n_averaged(tmp_path: Path) -> None:
    layout = _torchvision_references(tmp_path)
    result = run(layout.path, *layout.args)
    assert_ok(result)
    out = read_output(ckpt.default_output_path(layout.path))
    assert int(out["model_ema"]["n_averaged"]) == 0
    averaged = torch.optim.swa_utils.AveragedModel(wsconvert.convert_model(torchvision.models.resnet18(num_classes=10)))
    averaged.load_state_dict(out["model_ema"], strict=True)
    assert "kept as is (outside the model): n_averaged" in result.stdout


def _shape(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


@pytest.mark.parametrize(
    "options",
    [
        ["--gn", "32"],
        [],
        ["--gn", "16", "--style", "paper", "--eps", "0.001"],
        ["--gn", "8", "--exclude", "layer4.*", "--exclude", "fc", "--skip-depthwise"],
        ["--include", "layer1.*"],
        ["--gn", "8", "--skip-unnormalized", "--input-shape", "1,3,32,32"],
    ],
    ids=lambda o: " ".join(o) or "defaults",
)
def test_options_reach_the_library(tmp_path: Path, options: list[str]) -> None:
    layout = _raw(tmp_path, "")
    assert_ok(run(layout.path, *layout.args, *options))
    parsed = {"gn": None, "eps": 1e-5, "style": "standard", "include": [], "exclude": [], "skip_depthwise": False}
    parsed |= {"skip_unnormalized": False, "input_shape": None}
    it = iter(options)
    for flag in it:
        name = flag[2:].replace("-", "_")
        if name in ("skip_depthwise", "skip_unnormalized"):
            parsed[name] = True
        elif name in ("include", "exclude"):
            parsed[name].append(next(it))
        else:
            parsed[name] = {"gn": int, "eps": float, "style": str, "input_shape": _shape}[name](next(it))
    library = {k: (v or None) if k in ("include", "exclude") else v for k, v in parsed.items()}
    out = read_output(ckpt.default_output_path(layout.path))
    assert_same_as_python(layout, out, library)
    assert out._metadata["__wsconvert__"]["options"] == library


@pytest.mark.parametrize("name", ["raw", "safetensors"])
def test_bake(tmp_path: Path, name: str) -> None:
    layout = LAYOUTS[name](tmp_path)
    result = run(layout.path, *layout.args, "--gn", 8, "--bake")
    assert_ok(result)
    out = read_output(ckpt.default_output_path(layout.path))
    assert "conv1.weight" in out and not any("parametrizations" in k for k in out)
    assert_same_as_python(layout, out, {"gn": 8}, bake=True)
    assert "baked" in result.stdout


def test_safetensors_output_records_options_in_metadata(tmp_path: Path) -> None:
    layout = _safetensors(tmp_path)
    assert_ok(run(layout.path, *layout.args, "--gn", 8))
    with safe_open(str(tmp_path / "model.ws.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    info = json.loads(metadata["wsconvert"])
    assert info["options"]["gn"] == 8 and info["version"] == wsconvert.__version__
    assert info["arch"] == "torchvision:resnet18" and info["arch_kwargs"] == {"num_classes": 10}


def test_raw_state_dict_records_options_without_breaking_strict_loading(tmp_path: Path) -> None:
    layout = _raw(tmp_path, "")
    assert_ok(run(layout.path, *layout.args, "--gn", 4))
    out = torch.load(tmp_path / "raw.ws.pt", weights_only=True)
    assert out._metadata["__wsconvert__"]["options"]["gn"] == 4
    wsconvert.convert_model(layout.build(), gn=4).load_state_dict(out, strict=True)


def test_converting_an_output_again_is_refused(tmp_path: Path) -> None:
    layout = _raw(tmp_path, "")
    assert_ok(run(layout.path, *layout.args, "--gn", 4))
    assert_one_line_error(run(tmp_path / "raw.ws.pt", *layout.args, "--gn", 4), "already converted by wsconvert")


# --- whole pickled models ----------------------------------------------------------------------------


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (self.path, "w"))


def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    torch.save({"state_dict": resnet().state_dict(), "payload": _Marker(str(marker))}, tmp_path / "evil.pt")
    result = run(tmp_path / "evil.pt", *RESNET_ARGS)
    assert_one_line_error(result, "open)")
    assert "runs code from the file" in result.stderr and "--trust-pickle" in result.stderr
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


def test_whole_model_requires_trust_pickle(tmp_path: Path) -> None:
    torch.save(resnet(), tmp_path / "whole.pt")
    assert_one_line_error(run(tmp_path / "whole.pt", "--gn", 8), "--trust-pickle")
    assert not (tmp_path / "whole.ws.pt").exists()


@pytest.mark.parametrize("options", [{"gn": 8}, {}, {"gn": 4, "style": "paper", "exclude": ["layer4.*"]}], ids=str)
def test_whole_model_roundtrip_with_wsconvert_load(tmp_path: Path, options: dict) -> None:
    model = resnet()
    torch.save(model, tmp_path / "whole.pt")
    flags = [f"--gn={options['gn']}"] if "gn" in options else []
    flags += [f"--style={options['style']}"] if "style" in options else []
    flags += [f"--exclude={p}" for p in options.get("exclude", [])]
    result = run(tmp_path / "whole.pt", "--trust-pickle", *flags)
    assert_ok(result)
    assert "wsconvert.load" in result.stdout
    loaded = wsconvert.load(tmp_path / "whole.ws.pt")
    expected = wsconvert.convert_model(model, **options)
    assert str(loaded) == str(expected)
    torch.testing.assert_close(loaded.state_dict(), expected.state_dict(), rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), expected.eval()(x), rtol=0, atol=0)
    loaded.train()(x).sum().backward()  # ready to train: gradients reach the original weights
    assert loaded.conv1.parametrizations.weight.original.grad is not None
    # the original module and the converted state dict share storage: the file is not doubled
    assert (tmp_path / "whole.ws.pt").stat().st_size < 1.05 * (tmp_path / "whole.pt").stat().st_size


def test_whole_model_bake_is_a_plain_module(tmp_path: Path) -> None:
    model = resnet()
    torch.save(model, tmp_path / "whole.pt")
    assert_ok(run(tmp_path / "whole.pt", "--trust-pickle", "--gn", 8, "--bake"))
    loaded = torch.load(tmp_path / "whole.ws.pt", weights_only=False)
    assert type(loaded.conv1) is nn.Conv2d and isinstance(loaded.bn1, nn.GroupNorm)
    expected = wsconvert.bake(wsconvert.convert_model(model, gn=8))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), expected.eval()(x), rtol=0, atol=0)
    assert wsconvert.load(tmp_path / "whole.ws.pt").__class__ is type(loaded)


def test_load_rebuilds_state_dict_outputs(tmp_path: Path) -> None:
    """State-dict outputs load with wsconvert.load too (tests/test_load_and_cli_polish.py covers the layouts)."""
    layout = _raw(tmp_path, "")
    assert_ok(run(layout.path, *layout.args, "--gn", 4))
    loaded = wsconvert.load(tmp_path / "raw.ws.pt")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), wsconvert.convert_model(layout.model, gn=4).eval()(x))


# --- flags ----------------------------------------------------------------------------------------------


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    layout = _torchvision_references(tmp_path)
    result = run(layout.path, *layout.args, "--gn", 8, "--dry-run")
    assert_ok(result)
    assert "Dry run: nothing written" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_dry_run_ignores_existing_output(tmp_path: Path) -> None:
    layout = _raw(tmp_path, "")
    (tmp_path / "raw.ws.pt").write_bytes(b"keep me")
    assert_ok(run(layout.path, *layout.args, "--dry-run"))
    assert (tmp_path / "raw.ws.pt").read_bytes() == b"keep me"


@pytest.mark.parametrize("dry_run", [False, True])
def test_json_output_is_only_the_report(tmp_path: Path, dry_run: bool) -> None:
    layout = _lightning(tmp_path)
    result = run(layout.path, *layout.args, "--gn", 8, "--json", *(["--dry-run"] if dry_run else []))
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["written"] is (not dry_run) and report["layout"] == "training checkpoint"
    assert report["entries"] == [
        {"key": "state_dict", "prefix": "model.", "tensors": 62, "kept_keys": ["criterion.pos_weight"]}
    ]
    assert {d["key"] for d in report["dropped"]} == {"optimizer_states", "lr_schedulers"}
    assert report["report"]["summary"]["replaced"] == 20
    assert report["report"]["options"]["gn"] == 8


def test_force_overwrites_existing_output(tmp_path: Path) -> None:
    layout = _raw(tmp_path, "")
    output = tmp_path / "out.pt"
    output.write_bytes(b"old")
    assert_one_line_error(run(layout.path, *layout.args, "-o", output), "already exists")
    assert output.read_bytes() == b"old"
    assert_ok(run(layout.path, *layout.args, "-o", output, "--force"))
    assert_same_as_python(layout, torch.load(output, weights_only=True), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt", "raw.pt"]


def test_output_equal_to_input_is_refused_even_with_force(tmp_path: Path) -> None:
    layout = _raw(tmp_path, "")
    before = sha256(layout.path)
    assert_one_line_error(run(layout.path, *layout.args, "-o", layout.path, "--force"), "is the input file")
    assert sha256(layout.path) == before


def test_interrupted_write_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = _raw(tmp_path, "")

    def failing_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        Path(f if isinstance(f, (str, Path)) else f.name).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.serialization, "save", failing_save)  # what wsconvert writes through
    result = run(layout.path, *layout.args)
    assert result.exit_code == 1 and "Aborted" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.pt"]


# --- bad input --------------------------------------------------------------------------------------


def _bad_file(case: str) -> Callable[[Path], Path]:
    from test_checkpoint import BAD_FILES

    return BAD_FILES[case][0]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("empty", "is empty"),
        ("truncated", "truncated or corrupt"),
        ("corrupt pickle", "cannot read"),
        ("text", "not a PyTorch"),
        ("random bytes", "not a PyTorch"),
        ("torchscript", "TorchScript archive"),
    ],
)
def test_bad_input_files(tmp_path: Path, case: str, message: str) -> None:
    path = _bad_file(case)(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(run(path, *RESNET_ARGS), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ([1, 2, 3], RESNET_ARGS, "holds a list"),
        ({"epoch": 3, "note": "x"}, RESNET_ARGS, "no model state dict found"),
        ({"conv.weight": torch.zeros(2)}, ["--arch", "torchvision:resnet18"], "none of its keys belong"),
        ("resnet10", ["--arch", "torchvision:resnet18"], "size mismatch for fc.weight"),
        ("resnet10", ["--arch", "torchvision:resnet19"], "no model named 'resnet19'"),
        ("resnet10", ["--arch", "timm:not_a_model"], "timm has no model named"),
        ("resnet10", ["--arch", "nosuchpkg:build"], "cannot import"),
        ("resnet10", [], "does not name its architecture"),
        ("resnet10", [*RESNET_ARGS, "--gn", "3", "--include", "["], None),
    ],
    ids=[
        "list",
        "no-state-dict",
        "unrelated",
        "num_classes",
        "unknown-torchvision",
        "unknown-timm",
        "bad-module",
        "no-arch",
        "ok-odd-groups",
    ],  # fmt: skip
)
def test_bad_content(tmp_path: Path, content: object, args: list[str], message: str | None) -> None:
    if content == "resnet10":
        content = resnet().state_dict()
    torch.save(content, tmp_path / "in.pt")
    result = run(tmp_path / "in.pt", *args)
    if message is None:
        assert_ok(result)
        return
    assert_one_line_error(result, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt"]


def test_num_classes_hint(tmp_path: Path) -> None:
    torch.save(resnet().state_dict(), tmp_path / "in.pt")
    result = run(tmp_path / "in.pt", "--arch", "torchvision:resnet18")
    assert_one_line_error(result, """try --arch-kwargs '{"num_classes": 10}'""")


@pytest.mark.parametrize(
    ("make_output", "message"),
    [
        (lambda p: p / "no_such_dir" / "out.pt", "does not exist"),
        (lambda p: p / "outdir", "is a directory"),
    ],
)
def test_bad_output(tmp_path: Path, make_output, message: str) -> None:
    (tmp_path / "outdir").mkdir()
    torch.save(resnet().state_dict(), tmp_path / "in.pt")
    assert_one_line_error(run(tmp_path / "in.pt", *RESNET_ARGS, "-o", make_output(tmp_path)), message)


def test_unwritable_output_directory(tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        # root ignores directory permissions: simulate the failure at the open() the writer does
        pytest.skip("running as root, which can write into read-only directories")
    locked = tmp_path / "locked"
    locked.mkdir()
    torch.save(resnet().state_dict(), tmp_path / "in.pt")
    locked.chmod(0o500)
    try:
        assert_one_line_error(run(tmp_path / "in.pt", *RESNET_ARGS, "-o", locked / "out.pt"), "not writable")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_unwritable_output_directory_reported_from_os_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever runs the tests (root too), a directory refusing writes gives one clear line and no file."""
    import os

    real_open = os.open

    def refusing_open(path: object, flags: int, *args: object) -> int:
        if str(path).startswith(str(tmp_path / "locked")) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    (tmp_path / "locked").mkdir()
    torch.save(resnet().state_dict(), tmp_path / "in.pt")
    monkeypatch.setattr(os, "open", refusing_open)
    assert_one_line_error(
        run(tmp_path / "in.pt", *RESNET_ARGS, "-o", tmp_path / "locked" / "out.pt"), "Permission denied"
    )
    assert list((tmp_path / "locked").iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gn", "0"], "--gn"),
        (["--gn", "-3"], "--gn"),
        (["--gn", "abc"], "--gn"),
        (["--arch-kwargs", "{num_classes: 10}"], "not valid JSON"),
        (["--arch-kwargs", "[1, 2]"], "must be a JSON object"),
        (["--eps", "0"], "--eps"),
        (["--eps", "nan"], "--eps"),
        (["--style", "fancy"], "--style"),
        (["--no-such-flag"], "No such option"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    torch.save(resnet().state_dict(), tmp_path / "in.pt")
    result = run(tmp_path / "in.pt", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt"]


def test_missing_argument_is_a_usage_error() -> None:
    result = run()
    assert result.exit_code == 2 and "Missing argument 'INPUT'" in result.stderr


def test_help_documents_exit_codes() -> None:
    result = run("--help")
    assert_ok(result)
    for line in ("0  success", "1  conversion or load error", "2  usage error", "--trust-pickle", "--bake"):
        assert line in result.stdout


def test_progress_on_stderr_only_for_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = _raw(tmp_path, "")
    quiet = run(layout.path, *layout.args, "-o", tmp_path / "a.pt")
    assert_ok(quiet)
    assert quiet.stderr == ""
    monkeypatch.setattr("wsconvert.cli._stderr_is_terminal", lambda: True)
    shown = run(layout.path, *layout.args, "-o", tmp_path / "b.pt")
    assert_ok(shown)
    for text in ("loading", "planning on torchvision:resnet18", "writing", "MiB (100%)", "done in"):
        assert text in shown.stderr
    assert_same_as_python(layout, read_output(tmp_path / "b.pt"), {})
    assert json.loads(run(layout.path, *layout.args, "--json", "--dry-run").stdout)["written"] is False


@pytest.mark.parametrize("gn", [8, None])
def test_detection_checkpoint_with_frozen_batchnorm_keys(tmp_path: Path, gn: int | None) -> None:
    """Detection models trained from a pretrained backbone use FrozenBatchNorm2d: no num_batches_tracked keys."""
    build = lambda: torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_fpn", num_classes=3,  # noqa: E731
                                                 weights_backbone=None)  # fmt: skip
    state_dict = {k: v for k, v in build().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": state_dict, "epoch": 1}, tmp_path / "det.pth")
    flags = ["--gn", gn] if gn else []
    arch = ["--arch", "torchvision:fasterrcnn_mobilenet_v3_large_fpn", "--arch-kwargs", '{"num_classes": 3}']
    assert_ok(run(tmp_path / "det.pth", *arch, *flags))
    out = read_output(tmp_path / "det.ws.pth")["model"]
    options = {"gn": gn} if gn else {}
    wsconvert.convert_model(build(), **options).load_state_dict(out, strict=True)
    assert torch.equal(
        out["backbone.body.0.0.parametrizations.weight.original"], state_dict["backbone.body.0.0.weight"]
    )
