"""Checkpoint I/O, layout detection, architecture specs and the state-dict rewrite (library level)."""

from __future__ import annotations

import argparse
import os
import stat
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import wsconvert
from wsconvert import ArchitectureError, CheckpointError
from wsconvert.checkpoint import keys as key_maps
from wsconvert.checkpoint import reader as ckpt
from wsconvert.checkpoint.arch import arch_from_checkpoint, resolve_arch
from wsconvert.checkpoint.rewrite import rewrite_state_dict

# --- helpers used by the module:callable specs below -------------------------------------------------


def tiny_net(channels: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, channels, 3), nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, 4, 1))


def not_a_module() -> int:
    return 3


class NeedsRealTensors(nn.Module):
    """A constructor that reads tensor values (like timm's drop-path schedules): fails on meta."""

    def __init__(self) -> None:
        super().__init__()
        widths = [int(x.item()) for x in torch.linspace(4, 8, 2)]
        self.conv = nn.Conv2d(3, widths[-1], 3)


def _tiny_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


# --- sniffing and loading ---------------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(tmp_path: Path) -> Path:
    good = tmp_path / "good.pt"
    torch.save(tiny_net().state_dict(), good)
    return _write_bytes(tmp_path / "truncated.pt", good.read_bytes()[: good.stat().st_size // 2])


def _torchscript(tmp_path: Path) -> Path:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(tiny_net()), path)
    return path


def _zip_not_torch(tmp_path: Path) -> Path:
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "hi")
    return path


def _directory(tmp_path: Path) -> Path:
    (tmp_path / "adir").mkdir()
    return tmp_path / "adir"


BAD_FILES = {
    "missing": (lambda p: p / "nope.pt", "no such file"),
    "directory": (_directory, "is a directory"),
    "empty": (lambda p: _write_bytes(p / "empty.pt", b""), "is empty"),
    "text": (lambda p: _write_bytes(p / "notes.pt", b"hello, not a checkpoint\n"), "not a PyTorch"),
    "random bytes": (lambda p: _write_bytes(p / "noise.bin", bytes(range(7, 250))), "not a PyTorch"),
    "truncated": (_truncated, "truncated or corrupt"),
    "corrupt pickle": (lambda p: _write_bytes(p / "bad.pt", b"\x80\x02garbage-after-the-protocol"), "cannot read"),
    "zip, not torch": (_zip_not_torch, "not a torch.save checkpoint"),
    "torchscript": (_torchscript, "TorchScript"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_raise_checkpoint_error(tmp_path: Path, case: str) -> None:
    make, message = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize(
    ("obj", "message"),
    [([1, 2, 3], "holds a list"), ({}, "holds a dict \\(empty\\)"), (torch.zeros(3), "holds a Tensor")],
)
def test_non_checkpoint_objects_raise(tmp_path: Path, obj: object, message: str) -> None:
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=message):
        ckpt.load_checkpoint(tmp_path / "x.pt")


class _Marker:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (self.path, "w"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_pickle_with_code_is_not_run_without_trust(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save(
        {"state_dict": tiny_net().state_dict(), "x": _Marker(str(marker))},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(CheckpointError, match="runs code from the file.*--trust-pickle"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_whole_module_needs_trust_and_loads_with_it(tmp_path: Path) -> None:
    model = tiny_net()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="torch.nn.modules.container.Sequential"):
        ckpt.load_checkpoint(tmp_path / "whole.pt")
    loaded = ckpt.load_checkpoint(tmp_path / "whole.pt", trust_pickle=True)
    assert loaded.kind == "module" and isinstance(loaded.obj, nn.Sequential)


def test_allowlisted_namespace_and_numpy_scalar_load_weights_only(tmp_path: Path) -> None:
    import numpy as np

    obj = {"state_dict": tiny_net().state_dict(), "args": argparse.Namespace(model="x"), "metric": np.float64(0.5)}
    torch.save(obj, tmp_path / "c.pt")
    loaded = ckpt.load_checkpoint(tmp_path / "c.pt")
    assert loaded.kind == "checkpoint" and loaded.mmap
    assert loaded.obj["args"].model == "x" and float(loaded.obj["metric"]) == 0.5


def test_torch_load_is_memory_mapped(tmp_path: Path) -> None:
    torch.save(tiny_net().state_dict(), tmp_path / "sd.pt")
    loaded = ckpt.load_checkpoint(tmp_path / "sd.pt")
    assert loaded.kind == "state_dict" and loaded.mmap


def test_safetensors_kind_and_metadata(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file(dict(tiny_net().state_dict()), tmp_path / "m.safetensors", metadata={"format": "pt"})
    loaded = ckpt.load_checkpoint(tmp_path / "m.safetensors")
    assert (loaded.format, loaded.kind, loaded.metadata) == ("safetensors", "state_dict", {"format": "pt"})


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    bad = (20).to_bytes(8, "little") + b'{"a": {"dtype": "F3' + b"x" * 40
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        ckpt.load_checkpoint(_write_bytes(tmp_path / "bad.safetensors", bad))


# --- layouts ------------------------------------------------------------------------------------------

EXPECTED = {"conv1.weight", "bn1.weight", "bn1.bias", "fc.weight"}


@pytest.mark.parametrize(
    ("keys", "prefix", "matched"),
    [
        (["conv1.weight", "bn1.weight", "bn1.bias", "fc.weight"], "", 4),
        (["module.conv1.weight", "module.bn1.weight", "module.fc.weight"], "module.", 3),
        (["_orig_mod.conv1.weight", "_orig_mod.fc.weight"], "_orig_mod.", 2),
        (["module._orig_mod.conv1.weight", "module._orig_mod.fc.weight"], "module._orig_mod.", 2),
        (["n_averaged", "module.conv1.weight", "module.bn1.bias"], "module.", 2),
        (["model.conv1.weight", "model.fc.weight", "criterion.weight"], "model.", 2),
        (["something.else", "other"], "", 0),
    ],
)
def test_match_prefix(keys: list[str], prefix: str, matched: int) -> None:
    assert key_maps.match_prefix(keys, EXPECTED) == (prefix, matched)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.pt", "model.ws.pt"),
        ("m.safetensors", "m.ws.safetensors"),
        ("ckpt.pth.tar", "ckpt.pth.ws.tar"),
        ("weights", "weights.ws"),
        ("last.ckpt", "last.ws.ckpt"),
    ],
)
def test_default_output_path(name: str, expected: str) -> None:
    assert ckpt.default_output_path(Path("/some/dir") / name) == Path("/some/dir") / expected


@pytest.mark.parametrize(
    ("key", "value", "dropped"),
    [
        ("optimizer", {"state": {}, "param_groups": []}, True),
        ("optimizer_states", [{"state": {}, "param_groups": []}], True),
        ("opt", {"state": {}, "param_groups": []}, True),
        ("lr_scheduler", {"last_epoch": 3}, True),
        ("lr_schedulers", [{"last_epoch": 3}], True),
        ("amp_scaler", {"scale": 1024.0}, False),
        ("epoch", 3, False),
        ("state_dict", {"a": torch.zeros(1)}, False),
    ],
)
def test_drop_reason(key: str, value: object, dropped: bool) -> None:
    assert (ckpt.drop_reason(key, value) is not None) == dropped


# --- atomic writes ----------------------------------------------------------------------------------


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_write_atomic_leaves_nothing_on_failure(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "out.pt"
    with pytest.raises(type(error)):
        with ckpt.write_atomic(target) as tmp:
            tmp.write_bytes(b"partial")
            raise error
    assert _leftovers(tmp_path) == []


def test_write_atomic_refuses_existing_output_unless_forced(tmp_path: Path) -> None:
    target = _write_bytes(tmp_path / "out.pt", b"old")
    with pytest.raises(CheckpointError, match="already exists.*--force"):
        ckpt.write_torch({"a": torch.ones(1)}, target)
    assert target.read_bytes() == b"old"
    ckpt.write_torch({"a": torch.ones(1)}, target, force=True)
    torch.testing.assert_close(torch.load(target)["a"], torch.ones(1))
    assert _leftovers(tmp_path) == ["out.pt"]


def test_write_atomic_output_not_created_when_appearing_midway(tmp_path: Path) -> None:
    target = tmp_path / "out.pt"
    with pytest.raises(CheckpointError, match="appeared while writing"):
        with ckpt.write_atomic(target) as tmp:
            tmp.write_bytes(b"new")
            target.write_bytes(b"someone else")
    assert target.read_bytes() == b"someone else"
    assert _leftovers(tmp_path) == ["out.pt"]


def test_written_file_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        ckpt.write_torch({"a": torch.ones(1)}, tmp_path / "out.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.pt").stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("make_target", "message"),
    [
        (lambda p: p / "missing_dir" / "out.pt", "does not exist"),
        (lambda p: p, "is a directory"),
    ],
)
def test_output_target_errors(tmp_path: Path, make_target, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        ckpt.check_output_target(make_target(tmp_path), force=False)


# --- architectures -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kwargs", "expected_type"),
    [
        ("torchvision:resnet18", {"num_classes": 10}, torchvision.models.ResNet),
        ("timm:resnet18", {"num_classes": 10}, None),
        (f"{__name__}:tiny_net", {"channels": 4}, nn.Sequential),
        ("torchvision:fasterrcnn_mobilenet_v3_large_fpn", {"num_classes": 3}, None),
    ],
)
def test_resolve_arch_builds_on_meta(spec: str, kwargs: dict, expected_type: type | None) -> None:
    arch = resolve_arch(spec, kwargs)
    model = arch.build_skeleton()
    assert all(p.is_meta for p in model.parameters())
    if expected_type is not None:
        assert isinstance(model, expected_type)
    assert arch.notes == []


def test_resolve_arch_falls_back_to_cpu_when_meta_fails() -> None:
    arch = resolve_arch(f"{__name__}:NeedsRealTensors")
    model = arch.build_skeleton()
    assert not any(p.is_meta for p in model.parameters())
    assert "meta device" in arch.notes[0]


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("torchvision:resnet19", {}, "no model named 'resnet19' \\(did you mean resnet18"),
        ("timm:resnetz50", {}, "timm has no model named"),
        ("nosuchpackage.models:build", {}, "cannot import 'nosuchpackage.models'"),
        (f"{__name__}:missing_function", {}, "has no attribute"),
        ("justaname", {}, "not a spec"),
        ("", {}, "empty --arch"),
        ("torchvision:resnet18", {"weights": "DEFAULT"}, "downloads nothing"),
        ("timm:resnet18", {"pretrained": True}, "downloads nothing"),
    ],
)
def test_resolve_arch_errors(spec: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ArchitectureError, match=message):
        resolve_arch(spec, kwargs)


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        (f"{__name__}:not_a_module", {}, "returned a int, not a torch.nn.Module"),
        ("torchvision:resnet18", {"no_such_argument": 1}, "TypeError.*check --arch-kwargs"),
    ],
)
def test_build_errors(spec: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ArchitectureError, match=message):
        resolve_arch(spec, kwargs).build_skeleton()


@pytest.mark.parametrize(
    ("checkpoint", "expected"),
    [
        ({"arch": "resnet18", "args": argparse.Namespace(num_classes=10)}, ("timm:resnet18", {"num_classes": 10})),
        ({"arch": "resnet18", "args": argparse.Namespace(num_classes=None)}, ("timm:resnet18", {})),
        ({"model": {}, "args": argparse.Namespace(model="resnet18")}, ("torchvision:resnet18", {})),
        ({"state_dict": {}}, None),
    ],
)
def test_arch_from_checkpoint(checkpoint: dict, expected: tuple | None) -> None:
    assert arch_from_checkpoint(checkpoint) == expected


# --- rewriting one state dict --------------------------------------------------------------------------


def _resnet(num_classes: int = 10) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():  # non-trivial running statistics, so that keeping BatchNorm is tested too
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


OPTION_SETS = [
    {"gn": 32},
    {},
    {"gn": 8, "style": "paper", "eps": 1e-3},
    {"gn": 16, "exclude": ["layer4.*"], "include": None},
    {"skip_depthwise": True, "include": ["layer1.*", "conv1"]},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: str(o) or "defaults")
@pytest.mark.parametrize("bake", [False, True], ids=["", "bake"])
def test_rewrite_matches_python_conversion(options: dict, bake: bool) -> None:
    original = _resnet()
    arch = resolve_arch("torchvision:resnet18", {"num_classes": 10})
    state_dict = original.state_dict()
    out, report, entry = rewrite_state_dict(state_dict, arch.build_skeleton(), options, bake=bake)

    expected = wsconvert.convert_model(original, **options)
    fresh = wsconvert.convert_model(arch.build(), **options)
    if bake:
        expected, fresh = wsconvert.bake(expected), wsconvert.bake(fresh)
    assert list(out) == list(fresh.state_dict())
    fresh.load_state_dict(out, strict=True)
    x = _tiny_input()
    torch.testing.assert_close(fresh.eval()(x), expected.eval()(x), rtol=0, atol=0)
    assert report.to_dict() == wsconvert.plan_conversion(original, **options).to_dict()
    assert entry.tensors == len(out) and entry.prefix == ""


def test_rewrite_reuses_tensors_without_copies() -> None:
    original = _resnet()
    state_dict = original.state_dict()
    out, _, _ = rewrite_state_dict(
        state_dict, resolve_arch("torchvision:resnet18", {"num_classes": 10}).build_skeleton(), {"gn": 32}
    )
    assert out["conv1.parametrizations.weight.original"].data_ptr() == state_dict["conv1.weight"].data_ptr()
    assert out["bn1.weight"].data_ptr() == state_dict["bn1.weight"].data_ptr()
    assert "bn1.running_mean" not in out


def test_rewrite_keeps_prefix_and_outside_keys() -> None:
    state_dict = OrderedDict([("n_averaged", torch.tensor(5))])
    state_dict.update((f"module.{k}", v) for k, v in _resnet().state_dict().items())
    arch = resolve_arch("torchvision:resnet18", {"num_classes": 10})
    out, _, entry = rewrite_state_dict(state_dict, arch.build_skeleton(), {"gn": 32})
    assert entry.prefix == "module." and entry.kept_keys == ["n_averaged"]
    assert next(iter(out)) == "n_averaged"
    assert "module.conv1.parametrizations.weight.original" in out
    assert "module" in out._metadata and "module.layer1.0.conv1" in out._metadata


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda sd: sd, 'size mismatch for fc.weight: \\[10, 512\\].*\\[1000, 512\\].*num_classes": 10'),
        (
            lambda sd: {k: v for k, v in sd.items() if k != "layer1.0.conv1.weight"},
            "missing keys layer1.0.conv1.weight",
        ),
        (lambda sd: {**sd, "extra.weight": torch.zeros(1)}, "unexpected keys extra.weight"),
        (lambda sd: {f"x{i}": v for i, v in enumerate(sd.values())}, "none of its keys belong"),
    ],
    ids=["num_classes", "missing", "unexpected", "unrelated"],
)
def test_rewrite_mismatch_messages(mutate, message: str) -> None:
    state_dict = mutate(dict(_resnet(num_classes=10).state_dict()))
    if "num_classes" not in message:
        arch = resolve_arch("torchvision:resnet18", {"num_classes": 10})
    else:
        arch = resolve_arch("torchvision:resnet18")
    with pytest.raises(CheckpointError, match=message):
        rewrite_state_dict(state_dict, arch.build_skeleton(), {"gn": 32}, arch=arch.describe())


def test_release_mapped_pages_keeps_values(tmp_path: Path) -> None:
    state_dict = tiny_net(64).state_dict()
    torch.save(state_dict, tmp_path / "sd.pt")
    loaded = ckpt.load_checkpoint(tmp_path / "sd.pt")
    released = ckpt.release_mapped_pages(tmp_path / "sd.pt")
    if os.uname().sysname == "Linux":
        assert released >= (tmp_path / "sd.pt").stat().st_size // 2
    torch.testing.assert_close(dict(loaded.obj), dict(state_dict), rtol=0, atol=0)  # re-read from the file


@pytest.mark.parametrize("bake", [False, True], ids=["", "bake"])
def test_pages_released_while_writing_give_the_same_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bake: bool
) -> None:
    from wsconvert.checkpoint.rewrite import convert_checkpoint

    original = _resnet()
    torch.save(original.state_dict(), tmp_path / "in.pt")
    options = {"gn": 8}
    monkeypatch.setattr(ckpt, "RELEASE_EVERY_BYTES", 2**16)
    calls = []
    real = ckpt.release_mapped_pages
    monkeypatch.setattr(ckpt, "release_mapped_pages", lambda path: calls.append(real(path)))
    convert_checkpoint(tmp_path / "in.pt", tmp_path / "out.pt", options=options, arch="torchvision:resnet18",
                       arch_kwargs={"num_classes": 10}, bake=bake)  # fmt: skip
    assert len(calls) > 10  # once per big record, plus once at the end
    expected = wsconvert.convert_model(original, **options)
    fresh = wsconvert.convert_model(torchvision.models.resnet18(num_classes=10), **options)
    if bake:
        expected, fresh = wsconvert.bake(expected), wsconvert.bake(fresh)
    fresh.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True), strict=True)
    x = _tiny_input()
    torch.testing.assert_close(fresh.eval()(x), expected.eval()(x), rtol=0, atol=0)


def test_unknown_entries_are_rewritten_only_when_they_match_the_architecture(tmp_path: Path) -> None:
    from wsconvert.checkpoint.rewrite import convert_checkpoint

    model = _resnet()
    checkpoint = {
        "teacher": model.state_dict(),  # not a known key, but a state dict of the architecture
        "class_weights": {"weight": torch.ones(10)},  # a tensor dict that is not the model
        "epoch": 1,
    }
    torch.save(checkpoint, tmp_path / "c.pt")
    result = convert_checkpoint(tmp_path / "c.pt", options={"gn": 8}, arch="torchvision:resnet18",
                                arch_kwargs={"num_classes": 10}, dry_run=True)  # fmt: skip
    assert [e.key for e in result.entries] == ["teacher"]
    assert result.kept == ["class_weights", "epoch"] and not result.written
    assert not (tmp_path / "c.ws.pt").exists()
