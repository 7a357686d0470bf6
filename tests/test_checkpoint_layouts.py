"""Checkpoint layouts as registered handlers (wsconvert.checkpoint.layouts) behind the one write path."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import wsconvert
from wsconvert.checkpoint import reader as ckpt
from wsconvert.checkpoint.layouts import (
    Entries,
    Layout,
    Output,
    StateDictLayout,
    checked_record,
    layout_of,
    register_layout,
    registered_layouts,
    unregister_layout,
)
from wsconvert.checkpoint.rewrite import _write, convert_checkpoint
from wsconvert.errors import CheckpointError, InvalidOptionError

OPTIONS = {"gn": 4}
ARCH = f"{__name__}:tiny_net"


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


def _trained() -> nn.Module:
    torch.manual_seed(0)
    model = tiny_net()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


def _assert_same_function(state_dict: dict, original: nn.Module) -> None:
    """``state_dict`` loads strictly into ``convert_model(tiny_net(), **OPTIONS)`` and gives the original's outputs."""
    fresh = wsconvert.convert_model(tiny_net(), **OPTIONS)
    fresh.load_state_dict(state_dict, strict=True)
    expected = wsconvert.convert_model(original, **OPTIONS)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(fresh.eval()(x), expected.eval()(x), rtol=0, atol=0)


# --- the built-ins ---------------------------------------------------------------------------------


def _safetensors(model: nn.Module, path: Path) -> None:
    save_file(dict(model.state_dict()), str(path))


def _state_dict(model: nn.Module, path: Path) -> None:
    torch.save(model.state_dict(), path)


def _training(model: nn.Module, path: Path) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}, path)


def _module(model: nn.Module, path: Path) -> None:
    torch.save(model, path)


def _modules(model: nn.Module, path: Path) -> None:
    """ultralytics' layout: whole modules under "model" and "ema" beside the optimizer and other entries."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save({"model": model, "ema": copy.deepcopy(model), "optimizer": optimizer.state_dict(), "epoch": 3}, path)


BUILTINS: dict[str, tuple[Callable, str, Callable[[Path], dict], str, str, list[str]]] = {
    # name: (write the input, suffix, read the output's model state dict, reported layout, format, kept entries)
    "safetensors": (_safetensors, ".safetensors", lambda p: load_file(str(p)), "state dict", "safetensors", []),
    "state dict": (_state_dict, ".pt", lambda p: torch.load(p, weights_only=True), "state dict", "torch.save", []),
    "training checkpoint": (
        _training, ".pt", lambda p: torch.load(p, weights_only=True)["state_dict"], "training checkpoint",
        "torch.save", ["epoch"],
    ),
    "whole pickled model": (
        _module, ".pt", lambda p: torch.load(p, weights_only=False)["state_dict"], "whole pickled model",
        "torch.save", [],
    ),
    "whole modules in a training checkpoint": (
        _modules, ".pt", lambda p: torch.load(p, weights_only=False)["ema"].state_dict(),
        "training checkpoint of whole modules", "torch.save", ["epoch"],
    ),
}  # fmt: skip
WHOLE = ("whole pickled model", "whole modules in a training checkpoint")  # need no --arch


def test_registry_lists_the_builtins_first_in_order() -> None:
    assert [layout.name for layout in registered_layouts()][: len(BUILTINS)] == list(BUILTINS)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtin_layout_round_trips(tmp_path: Path, name: str) -> None:
    write, suffix, read, label, fmt, kept = BUILTINS[name]
    original = _trained()
    source, target = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    write(original, source)
    assert layout_of(ckpt.load_checkpoint(source, trust_pickle=True)).name == name

    arch = None if name in WHOLE else ARCH
    result = convert_checkpoint(source, target, options=OPTIONS, arch=arch, trust_pickle=True)
    assert (result.layout, result.format, result.kept, result.written) == (label, fmt, kept, True)
    _assert_same_function(read(target), original)
    with pytest.raises(CheckpointError, match="was already converted by wsconvert"):
        convert_checkpoint(target, tmp_path / f"again{suffix}", options=OPTIONS, arch=arch, trust_pickle=True)


# --- a registered layout ---------------------------------------------------------------------------


class WeightsLayout(Layout):
    """A toy layout: a dict holding one state dict under "weights", its record under "toy_record"."""

    name = "toy weights"
    label = "toy weights file"

    def matches(self, loaded: ckpt.Loaded) -> bool:
        obj = loaded.obj
        return loaded.kind == "checkpoint" and set(obj) <= {"weights", "toy_record"} and "weights" in obj

    def record(self, loaded: ckpt.Loaded) -> dict | None:
        if "toy_record" not in loaded.obj:
            return None
        return checked_record(loaded, "its entry 'toy_record'", loaded.obj["toy_record"])

    def entries(self, loaded: ckpt.Loaded, architecture: object) -> Entries:
        if not ckpt.is_state_dict(loaded.obj["weights"]):
            raise CheckpointError(f"{loaded.path}: its 'weights' entry is not a state dict")
        return Entries({"weights": loaded.obj["weights"]})

    def assemble(self, loaded, rewritten, info, *, calibration_data=None) -> list[Output]:  # noqa: ANN001
        return [Output({"weights": rewritten["weights"], "toy_record": info})]


@pytest.fixture
def toy_layout():
    layout = register_layout(WeightsLayout())
    yield layout
    unregister_layout(layout.name)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path]]:
    """The atomic writes made (reader.write_torch / write_safetensors), each still carried out."""
    calls: list[tuple[str, Path]] = []
    for name in ("write_torch", "write_safetensors"):
        real = getattr(ckpt, name)

        def spy(obj, path, *args, _real=real, _name=name, **kwargs):  # noqa: ANN001, ANN202
            calls.append((_name, Path(path)))
            return _real(obj, path, *args, **kwargs)

        monkeypatch.setattr(ckpt, name, spy)
    return calls


def test_registered_layout_converts_through_the_one_write_path(
    tmp_path: Path, toy_layout: Layout, writes: list
) -> None:
    original = _trained()
    torch.save({"weights": original.state_dict()}, tmp_path / "w.pt")
    assert registered_layouts()[-1] is toy_layout
    result = convert_checkpoint(tmp_path / "w.pt", tmp_path / "w.ws.pt", options=OPTIONS, arch=ARCH)
    assert (result.layout, result.format, [e.key for e in result.entries]) == (
        "toy weights file",
        "torch.save",
        ["weights"],
    )
    assert writes == [("write_torch", tmp_path / "w.ws.pt")]
    out = torch.load(tmp_path / "w.ws.pt", weights_only=True)
    assert set(out) == {"weights", "toy_record"} and out["toy_record"]["options"] == OPTIONS
    _assert_same_function(out["weights"], original)
    with pytest.raises(CheckpointError, match="was already converted by wsconvert"):
        convert_checkpoint(tmp_path / "w.ws.pt", tmp_path / "again.pt", options=OPTIONS, arch=ARCH)


def test_registered_layout_dry_run_writes_nothing(tmp_path: Path, toy_layout: Layout, writes: list) -> None:
    torch.save({"weights": _trained().state_dict()}, tmp_path / "w.pt")
    result = convert_checkpoint(tmp_path / "w.pt", options=OPTIONS, arch=ARCH, dry_run=True)
    assert result.layout == "toy weights file" and not result.written
    assert writes == [] and not (tmp_path / "w.ws.pt").exists()


def test_registered_layout_record_errors_name_the_entry(tmp_path: Path, toy_layout: Layout) -> None:
    torch.save({"weights": _trained().state_dict(), "toy_record": torch.ones(2)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="its entry 'toy_record' is a strided torch.float32 tensor"):
        convert_checkpoint(tmp_path / "w.pt", options=OPTIONS, arch=ARCH)
    assert not (tmp_path / "w.ws.pt").exists()


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([1, 2], "holds a list, not a model checkpoint"),
        ({"epoch": 1}, "no model state dict found in .*: its entries are epoch"),
        ({"weights": 3}, "its 'weights' entry is not a state dict"),  # the toy layout's own refusal
        ({"weights": torch.ones(1), "epoch": 1}, "no model state dict found in"),  # not the toy: a training checkpoint
    ],
)
def test_unrecognized_layouts_keep_their_errors(
    tmp_path: Path, toy_layout: Layout, writes: list, obj: object, message: str
) -> None:
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint(tmp_path / "x.pt", options=OPTIONS, arch=ARCH)
    assert writes == [] and not (tmp_path / "x.ws.pt").exists()


def test_no_matching_layout_is_a_checkpoint_error(tmp_path: Path) -> None:
    loaded = ckpt.Loaded(tmp_path / "x.bin", "onnx", "graph", object())
    with pytest.raises(
        CheckpointError, match="no checkpoint layout handles this onnx graph; known layouts: safetensors"
    ):
        layout_of(loaded)


# --- bad registrations and outputs ----------------------------------------------------------------


class _Nameless(StateDictLayout):
    name = ""


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (object(), "expected an instance of wsconvert.checkpoint.layouts.Layout"),
        (_Nameless(), "_Nameless has no name"),
        (StateDictLayout(), "a layout named 'state dict' is already registered"),
    ],
)
def test_register_layout_refuses(layout: object, message: str) -> None:
    before = registered_layouts()
    with pytest.raises(InvalidOptionError, match=message):
        register_layout(layout)  # type: ignore[arg-type]
    assert registered_layouts() == before


def test_unregister_unknown_layout_names_the_registered_ones() -> None:
    with pytest.raises(InvalidOptionError, match="no such layout; registered: 'safetensors', 'state dict'"):
        unregister_layout("hf directory")


def test_output_refuses_an_unknown_format() -> None:
    with pytest.raises(InvalidOptionError, match="Output\\(format='onnx'\\): the write path writes 'torch.save' or"):
        Output({}, "onnx")


def test_write_path_writes_named_outputs_inside_the_output(tmp_path: Path, writes: list) -> None:
    """Several output files (a sharded layout): each ``Output.name`` is written atomically at ``output/name``."""
    state_dict = tiny_net().state_dict()
    outputs = [Output(state_dict, name="a.pt"), Output(dict(state_dict), "safetensors", {"k": "v"}, "b.safetensors")]
    _write(outputs, tmp_path, force=False, on_bytes=None, release=None, source=None)
    assert writes == [("write_torch", tmp_path / "a.pt"), ("write_safetensors", tmp_path / "b.safetensors")]
    for key, value in load_file(str(tmp_path / "b.safetensors")).items():
        torch.testing.assert_close(value, state_dict[key])
    torch.testing.assert_close(torch.load(tmp_path / "a.pt", weights_only=True), dict(state_dict))


@pytest.mark.parametrize("preserve", [False, True], ids=["", "preserve"])
def test_each_state_dict_is_walked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preserve: bool) -> None:
    """The CLI path plans each rewritten state dict once (wsconvert.make_plan) and applies that plan."""
    from wsconvert import walk

    walks = []
    real = walk.plan
    monkeypatch.setattr(walk, "plan", lambda root, *args, **kwargs: walks.append(root) or real(root, *args, **kwargs))
    torch.save({"state_dict": _trained().state_dict(), "state_dict_ema": _trained().state_dict()}, tmp_path / "c.pt")
    torch.save(torch.randn(4, 3, 12, 12), tmp_path / "calibration.pt")
    options = OPTIONS | {"preserve": preserve}
    calibration = tmp_path / "calibration.pt" if preserve else None
    result = convert_checkpoint(tmp_path / "c.pt", options=options, arch=ARCH, calibration=calibration)
    assert len(walks) == 2 and walks[0] is not walks[1]  # one per entry
    assert (result.report.fidelity is not None) == preserve


# --- whole modules inside a training checkpoint (ultralytics' layout, issue 13 point 6) -------------------------


def test_whole_modules_are_converted_consistently_and_pickle(tmp_path: Path) -> None:
    """Every module entry is converted with the same options; the output unpickles as converted, picklable modules
    (torch refuses to pickle parametrized modules) and wsconvert.load gives the main one."""
    original = _trained()
    _modules(original, tmp_path / "in.pt")
    result = convert_checkpoint(tmp_path / "in.pt", tmp_path / "out.pt", options=OPTIONS, trust_pickle=True)
    assert [e.key for e in result.entries] == ["model", "ema"] and [k for k, _ in result.dropped] == ["optimizer"]
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert out["wsconvert"]["modules"] == ["model", "ema"] and out["epoch"] == 3
    for key in ("model", "ema"):
        assert wsconvert.is_standardized(out[key][0]) and isinstance(out[key][1], nn.GroupNorm)
        assert out[key]._wsconvert_info["options"] == OPTIONS
        _assert_same_function(out[key].state_dict(), original)
    torch.save(out["model"], tmp_path / "again.pt")  # still picklable after loading
    assert wsconvert.is_standardized(torch.load(tmp_path / "again.pt", weights_only=False)[0])
    loaded = wsconvert.load(tmp_path / "out.pt")
    assert wsconvert.is_standardized(loaded[0])
    _assert_same_function(wsconvert.load(tmp_path / "out.pt", entry="ema").state_dict(), original)
    with pytest.raises(CheckpointError, match="has no module entry 'net'; its module entries are 'model', 'ema'"):
        wsconvert.load(tmp_path / "out.pt", entry="net")


def test_whole_modules_baked_are_plain_modules(tmp_path: Path) -> None:
    original = _trained()
    _modules(original, tmp_path / "in.pt")
    convert_checkpoint(tmp_path / "in.pt", tmp_path / "out.pt", options=OPTIONS, trust_pickle=True, bake=True)
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    expected = wsconvert.bake(wsconvert.convert_model(original, **OPTIONS)).eval()
    x = torch.randn(2, 3, 12, 12)
    for key in ("model", "ema"):
        assert type(out[key][0]) is nn.Conv2d
        torch.testing.assert_close(out[key].eval()(x), expected(x))


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"model": tiny_net(), "ema": nn.Sequential(nn.Conv2d(3, 8, 3))}, "entries 'model' .* and 'ema' .* are not"),
        ({"model": tiny_net(), "wsconvert": {"version": "0"}}, "was already converted by wsconvert 0"),
    ],
    ids=["different modules", "already converted"],
)
def test_whole_modules_refusals(tmp_path: Path, obj: dict, message: str) -> None:
    torch.save(obj, tmp_path / "in.pt")
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint(tmp_path / "in.pt", options=OPTIONS, trust_pickle=True)
    assert not (tmp_path / "in.ws.pt").exists()


def test_whole_modules_need_trust_pickle(tmp_path: Path) -> None:
    _modules(_trained(), tmp_path / "in.pt")
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        convert_checkpoint(tmp_path / "in.pt", options=OPTIONS)
