"""transformers ``save_pretrained`` directories through the command (issue 13, point 7).

Real transformers models (ResNet, ConvNeXt, BiT) are built from small configs with random weights and saved with
``save_pretrained`` into tmp_path, single-file and sharded (a small ``max_shard_size``). ``wsconvert DIR`` must
write a directory that ``load_pretrained`` turns into a model computing exactly what ``convert_model(original,
same options)`` computes, that transformers' own ``from_pretrained`` refuses loudly, and bad directories must each
be one ``Error:`` line, exit 1, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _thirdparty import needs
from click.testing import CliRunner, Result

import wsconvert
from wsconvert.checkpoint import directory as hfdir
from wsconvert.cli import main

transformers = needs("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

SHARD = "20KB"  # forces several shards on each model below


def resnet() -> torch.nn.Module:
    config = transformers.ResNetConfig(
        embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], layer_type="basic", num_labels=3
    )
    return transformers.ResNetForImageClassification(config)


def convnext() -> torch.nn.Module:
    config = transformers.ConvNextConfig(hidden_sizes=[32, 64], depths=[1, 1], num_stages=2, num_labels=3)
    return transformers.ConvNextForImageClassification(config)


def bit() -> torch.nn.Module:
    config = transformers.BitConfig(
        embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, layer_type="preactivation", num_labels=3
    )
    return transformers.BitForImageClassification(config)


MODELS: dict[str, Callable[[], torch.nn.Module]] = {"resnet": resnet, "convnext": convnext, "bit": bit}
EXTRA_FILES = {"preprocessor_config.json": b'{"size": 32}\n', "README.md": b"# tiny\n"}


def run(*args: object) -> Result:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(main, [str(a) for a in args], prog_name="wsconvert")


def save(model: torch.nn.Module, path: Path, *, sharded: bool) -> Path:
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial running statistics, so that dropping them is visible
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    model.save_pretrained(path, max_shard_size=SHARD if sharded else "5GB")
    for name, data in EXTRA_FILES.items():
        (path / name).write_bytes(data)
    return path


def converted_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).logits


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], tuple[torch.nn.Module, Path]]:
    """Each model saved once, single-file and sharded: (name, sharded) -> (in-memory model, directory)."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name, build in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        for sharded in (False, True):
            out[name, sharded] = (
                model,
                save(model, root / f"{name}-{'sharded' if sharded else 'single'}", sharded=sharded),
            )
    return out


# --- good inputs: the output loads back to the converted model -------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("name", list(MODELS))
def test_directory_round_trip(saved, tmp_path: Path, name: str, sharded: bool) -> None:
    model, source = saved[name, sharded]
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    result = run(source, "--gn", 32, "-o", out)
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before, "the input directory changed"

    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("wsconvert-model")]
    assert "model.safetensors" not in files and "model.safetensors.index.json" not in files
    for extra, data in EXTRA_FILES.items():
        assert (out / extra).read_bytes() == data
    config = json.loads((out / "config.json").read_text())
    record = config["wsconvert"]
    assert record["arch"] == f"transformers:{type(model).__name__}" and record["options"]["gn"] == 32
    assert record["version"] == wsconvert.__version__ and record["format"] == hfdir.DIRECTORY_FORMAT
    assert config["transformers_weights"] == hfdir.FROM_PRETRAINED_GUARD
    input_shards = [p for p in source.iterdir() if p.name.startswith("model-")]
    if sharded:
        assert len(input_shards) > 1
        index = json.loads((out / hfdir.OUTPUT_INDEX).read_text())
        assert sorted(set(index["weight_map"].values())) == [s for s in shards if s.endswith(".safetensors")]
        assert len(shards) - 1 == len(input_shards)  # same grouping as the input's shards (+ the index)
    else:
        assert shards == [hfdir.OUTPUT_WEIGHTS]

    reference = wsconvert.convert_model(model, gn=32).eval()
    loaded = hfdir.load_pretrained(out)
    assert not loaded.training
    assert list(loaded.state_dict()) == list(reference.state_dict())
    if sharded:
        assert set(index["weight_map"]) == set(reference.state_dict())
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(converted_output(loaded, x), converted_output(reference, x), rtol=0, atol=0)
    via_load = wsconvert.load(out)  # the one-liner for every wsconvert output, directories included
    assert not via_load.training
    torch.testing.assert_close(converted_output(via_load, x), converted_output(reference, x), rtol=0, atol=0)
    assert leftovers(tmp_path) == []


def test_from_pretrained_never_loads_the_output_silently(saved, tmp_path: Path) -> None:
    """transformers' loaders refuse the output with a message naming wsconvert; without the guard in config.json
    they still find no weights file they load (the converted weights are under wsconvert-model*)."""
    model, source = saved["resnet", True]
    out = tmp_path / "out"
    assert run(source, "--gn", 32, "-o", out).exit_code == 0
    loaders = {
        "AutoModel": lambda: transformers.AutoModel.from_pretrained(out),
        "AutoModelForImageClassification": lambda: transformers.AutoModelForImageClassification.from_pretrained(out),
        "ResNetForImageClassification": lambda: transformers.ResNetForImageClassification.from_pretrained(out),
        "pipeline": lambda: transformers.pipeline("image-classification", model=str(out)),
    }
    for load in loaders.values():
        with pytest.raises((ValueError, OSError), match="wsconvert"):
            load()
    config = json.loads((out / "config.json").read_text())
    del config["transformers_weights"]
    (out / "config.json").write_text(json.dumps(config))
    for load in loaders.values():
        with pytest.raises((OSError, ValueError), match="no file named"):
            load()


@pytest.mark.parametrize(
    "args",
    [
        ["--gn", "32", "--preserve"],
        ["--gn", "32", "--bake"],
        ["--bake"],
        ["--gn", "32", "--exclude", "classifier"],
        ["--gn", "32", "--norm", "bcn"],
    ],
    ids=["preserve", "gn-bake", "bake", "exclude", "bcn"],
)
def test_options_round_trip(saved, tmp_path: Path, args: list[str]) -> None:
    model, source = saved["resnet", True]
    out = tmp_path / "out"
    result = run(source, *args, "-o", out)
    assert result.exit_code == 0, result.output
    options = {"gn": 32 if "--gn" in args else None, "preserve": "--preserve" in args}
    if "--exclude" in args:
        options["exclude"] = ["classifier"]
    if "--norm" in args:
        options["norm"] = "bcn"
    reference = wsconvert.convert_model(model, **options).eval()
    if "--bake" in args:
        reference = wsconvert.bake(reference)
    loaded = hfdir.load_pretrained(out)
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(converted_output(loaded, x), converted_output(reference, x))


def test_calibration_round_trip(saved, tmp_path: Path) -> None:
    model, source = saved["resnet", True]
    inputs = torch.randn(4, 3, 32, 32)
    torch.save(inputs, tmp_path / "calibration.pt")
    out = tmp_path / "out"
    result = run(source, "--gn", 32, "--preserve", "--calibration", tmp_path / "calibration.pt", "-o", out)
    assert result.exit_code == 0, result.output
    assert "Fidelity on the calibration data" in result.stdout
    reference = wsconvert.convert_model(model, gn=32, preserve=True, calibration_data=[inputs]).eval()
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(converted_output(hfdir.load_pretrained(out), x), converted_output(reference, x))


def test_default_output_dry_run_force_and_arch(saved, tmp_path: Path) -> None:
    model, original = saved["resnet", False]
    source = tmp_path / "tiny-resnet"
    shutil.copytree(original, source)
    default = tmp_path / "tiny-resnet.ws"
    assert run(source, "--gn", 32, "--dry-run").exit_code == 0 and not default.exists()
    assert run(source, "--gn", 32).exit_code == 0 and (default / "config.json").is_file()
    again = run(source, "--gn", 32)
    assert again.exit_code == 1 and "already exists; pass --force" in again.stderr
    forced = run(source, "--gn", 16, "--force", "--arch", "transformers:ResNetForImageClassification")
    assert forced.exit_code == 0, forced.output
    assert json.loads((default / "config.json").read_text())["wsconvert"]["options"]["gn"] == 16
    reference = wsconvert.convert_model(model, gn=16).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(converted_output(hfdir.load_pretrained(default), x), converted_output(reference, x))
    assert leftovers(tmp_path) == []


def test_hub_cache_style_symlinks_are_followed(saved, tmp_path: Path) -> None:
    """A Hub cache snapshot is a directory of symlinks to blobs elsewhere: followed like a symlinked file input."""
    model, original = saved["convnext", True]
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    for path in original.iterdir():
        shutil.copy(path, blobs / path.name)
        (snapshot / path.name).symlink_to(blobs / path.name)
    out = tmp_path / "out"
    assert run(snapshot, "--gn", 32, "-o", out).exit_code == 0
    assert not any(p.is_symlink() for p in out.iterdir())
    x = torch.randn(1, 3, 32, 32)
    reference = wsconvert.convert_model(model, gn=32).eval()
    torch.testing.assert_close(converted_output(hfdir.load_pretrained(out), x), converted_output(reference, x))


# --- bad inputs: one Error line, exit 1, nothing written ------------------------------------------------


def _edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        document = json.loads((directory / name).read_text())
        change(document)
        (directory / name).write_text(json.dumps(document))

    return edit


def _first_shard_key(directory: Path) -> tuple[dict, str]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return index, next(iter(index["weight_map"]))


def _retarget(target: str) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        index, key = _first_shard_key(directory)
        index["weight_map"][key] = target.replace("ABS", str(directory / index["weight_map"][key]))
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))

    return edit


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda directory: (directory / name).write_bytes(data)


def _unlink(name: str) -> Callable[[Path], None]:
    return lambda directory: (directory / name).unlink()


def _fifo(directory: Path) -> None:
    os.mkfifo(directory / "pipe")


def _dangling(directory: Path) -> None:
    (directory / "tokenizer.json").symlink_to(directory / "nowhere.json")


def _drop_shards(directory: Path) -> None:
    for path in directory.glob("model*"):
        path.unlink()


def _converted(directory: Path) -> None:
    _edit_json("config.json", lambda c: c.update(wsconvert={"version": "0.1.0", "options": {"gn": 32}}))(directory)


def _garbage_shard(directory: Path) -> None:
    index, key = _first_shard_key(directory)
    (directory / index["weight_map"][key]).write_bytes(b"not a safetensors file at all")


BAD_DIRECTORIES: dict[str, tuple[Callable[[Path], None], str]] = {
    "no config.json": (_unlink("config.json"), "is a directory without config.json"),
    "config.json not JSON": (_write("config.json", b'{"model_type": "resnet",'), "config.json is not valid JSON"),
    "config.json a list": (_write("config.json", b"[1, 2]"), "holds a JSON list, not an object"),
    "unknown architecture": (
        _edit_json("config.json", lambda c: c.update(architectures=["NoSuchModelForImages"])),
        "names the architecture transformers:NoSuchModelForImages, which cannot be built here",
    ),
    "no architectures": (
        _edit_json("config.json", lambda c: c.pop("architectures")),
        "has model_type 'resnet' but no 'architectures'",
    ),
    "no architecture at all": (_write("config.json", b"{}"), "names no architecture"),
    "index: ../ traversal": (_retarget("../model-00001-of-00002.safetensors"), "which is a path, not a file name"),
    "index: absolute path": (_retarget("ABS"), "which is a path, not a file name"),
    "index: missing shard": (_retarget("model-00009-of-00009.safetensors"), "is missing"),
    "index: key not in shard": (
        _edit_json(
            "model.safetensors.index.json",
            lambda i: i["weight_map"].update({"extra.weight": next(iter(i["weight_map"].values()))}),
        ),
        "does not hold them",
    ),
    "index: key not listed": (
        _edit_json("model.safetensors.index.json", lambda i: i["weight_map"].pop(next(iter(i["weight_map"])))),
        "which the index does not map to it",
    ),
    "index not JSON": (_write("model.safetensors.index.json", b"{oops"), "is not valid JSON"),
    "index without weight_map": (_write("model.safetensors.index.json", b'{"metadata": {}}'), "has no 'weight_map'"),
    "shard not safetensors": (_garbage_shard, "not a PyTorch (torch.save) or safetensors checkpoint"),
    "no weights": (_drop_shards, "holds no model weights"),
    "a FIFO inside": (_fifo, "is a FIFO (named pipe), not a regular file"),
    "a dangling symlink inside": (_dangling, "is a dangling symlink"),
    "already converted": (_converted, "was already converted by wsconvert"),
}


@pytest.mark.parametrize("case", list(BAD_DIRECTORIES))
def test_bad_directories(saved, tmp_path: Path, case: str) -> None:
    make, message = BAD_DIRECTORIES[case]
    source = tmp_path / "in"
    shutil.copytree(saved["resnet", True][1], source)
    make(source)
    before = sorted(p.name for p in source.iterdir())
    out = tmp_path / "out"
    result = run(source, "--gn", 32, "-o", out)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists() and leftovers(tmp_path) == []
    assert sorted(p.name for p in source.iterdir()) == before


def _existing_other_directory(tmp_path: Path) -> Path:
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    return other


def _a_file(path: Path) -> Path:
    path.write_bytes(b"x")
    return path


BAD_OUTPUTS: dict[str, tuple[Callable[[Path, Path], Path], list[str], str]] = {
    "exists, no --force": (lambda t, s: _existing_other_directory(t), [], "already exists; pass --force"),
    "not ours, --force": (lambda t, s: _existing_other_directory(t), ["--force"], "that wsconvert did not write"),
    "a file": (lambda t, s: _a_file(t / "f"), ["--force"], "is a file"),
    "inside the input": (lambda t, s: s / "converted", [], "is inside the input directory"),
    "the input itself": (lambda t, s: s, ["--force"], "is the input"),
    "missing parent": (lambda t, s: t / "no" / "out", [], "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_bad_outputs(saved, tmp_path: Path, case: str) -> None:
    make, flags, message = BAD_OUTPUTS[case]
    source = tmp_path / "in"
    shutil.copytree(saved["resnet", False][1], source)
    before = sorted(p.name for p in source.iterdir())
    target = make(tmp_path, source)
    result = run(source, "--gn", 32, "-o", target, *flags)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ") and message in result.stderr, result.stderr
    assert sorted(p.name for p in source.iterdir()) == before
    if case.startswith(("exists", "not ours")):
        assert (target / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fault", ["ctrl-c", "enospc"])
def test_failure_while_writing_leaves_nothing(
    saved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A failure after the first shard was written: no output directory, no temporary directory."""
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def failing(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt if fault == "ctrl-c" else OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    out = tmp_path / "out"
    result = run(saved["resnet", True][1], "--gn", 32, "-o", out)
    assert result.exit_code == 1
    expected = "Aborted!" if fault == "ctrl-c" else "Error: cannot write"
    assert expected in result.stderr and "Traceback" not in result.output, result.output
    assert len(calls) == 2 and not out.exists() and leftovers(tmp_path) == []


def test_load_pretrained_errors(saved, tmp_path: Path) -> None:
    with pytest.raises(wsconvert.CheckpointError, match="was not written by wsconvert"):
        hfdir.load_pretrained(saved["resnet", False][1])
    out = tmp_path / "out"
    assert run(saved["resnet", True][1], "--gn", 32, "-o", out).exit_code == 0
    index = json.loads((out / hfdir.OUTPUT_INDEX).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "../x.safetensors"
    (out / hfdir.OUTPUT_INDEX).write_text(json.dumps(index))
    with pytest.raises(wsconvert.CheckpointError, match="which is a path, not a file name"):
        hfdir.load_pretrained(out)


def test_pytorch_model_bin_directory(saved, tmp_path: Path) -> None:
    """Older transformers wrote pytorch_model.bin (a torch.save state dict): read safely, written as safetensors."""
    model, original = saved["resnet", False]
    source = tmp_path / "legacy"
    source.mkdir()
    shutil.copy(original / "config.json", source / "config.json")
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    out = tmp_path / "out"
    result = run(source, "--gn", 32, "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", hfdir.OUTPUT_WEIGHTS]
    reference = wsconvert.convert_model(model, gn=32).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(converted_output(hfdir.load_pretrained(out), x), converted_output(reference, x))
