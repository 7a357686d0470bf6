"""The checkpoint reader against hostile or unusual files (issue 10, points 3, 4, 13-15).

Every file is built on the fly in tmp_path. Bad files must give one ``Error:`` line, exit 1, no output, no
temporary file and an untouched input; legal files must load with the values ``torch.load`` (without mmap)
returns and convert to exactly what the ordinary file converts to.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file
from torch import nn
from torch.testing import assert_close

from wsconvert import CheckpointError
from wsconvert.checkpoint import archive as archive_module
from wsconvert.checkpoint import keys as key_maps
from wsconvert.checkpoint import reader as ckpt
from wsconvert.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = ["--arch", "torchvision:mobilenet_v3_small", "--arch-kwargs", '{"num_classes": 10}']
CONV = "features.0.0.weight"  # the first conv of torchvision's mobilenet_v3_small


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="wsconvert")


@pytest.fixture(scope="module")
def state_dict() -> OrderedDict:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_refused(path: Path, message: str, *extra: object) -> None:
    """One ``Error:`` line containing ``message``, exit 1, nothing written next to the input, input unchanged."""
    before, names = digest(path), sorted(p.name for p in path.parent.iterdir())
    result = run(path, *ARCH, "--gn", 8, *extra)
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0], lines[0]
    assert result.stdout == ""
    assert sorted(p.name for p in path.parent.iterdir()) == names  # no output, no temp file
    assert digest(path) == before


def converted(path: Path, out: Path, *extra: object) -> dict:
    result = run(path, *ARCH, "--gn", 8, "-o", out, *extra)
    assert result.exit_code == 0, (result.output, result.exception)
    return load_file(out) if out.suffix == ".safetensors" else torch.load(out, weights_only=True)


def assert_same_tensors(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    assert_close(dict(got), dict(want), rtol=0, atol=0)


# --- files -----------------------------------------------------------------------------------------------


def rezip(source: Path, target: Path, compression: int) -> Path:
    """The archive rewritten member by member by zipfile (what a zip tool does): compressed or unaligned."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", compression) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return target


def save_big_endian(state_dict: dict, path: Path) -> Path:
    """A torch.save file written as a big-endian machine writes it: byteswapped records, byteorder "big"."""

    def swapped(t: torch.Tensor) -> torch.Tensor:
        if t.element_size() == 1:
            return t
        raw = t.contiguous().reshape(-1).view(torch.uint8).view(-1, t.element_size()).flip(1)
        return raw.contiguous().view(t.dtype).view(t.shape)

    with mock.patch.object(sys, "byteorder", "big"):  # torch.save records sys.byteorder
        torch.save(OrderedDict((k, swapped(v)) for k, v in state_dict.items()), path)
    return path


class _Numpy1Pickler(pickle._Pickler):
    """Pickles numpy scalars under numpy 1.x's name numpy.core.multiarray.scalar (numpy 2 says numpy._core)."""

    def save_global(self, obj: object, name: str | None = None) -> None:
        if obj is np._core.multiarray.scalar:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


class _Marker:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (self.path, "w"))


def _bomb(state_dict: dict, tmp: Path, member: str, mib: int) -> Path:
    """``state_dict`` saved by torch.save, then rewritten with ``mib`` MiB of zeros appended to the member
    ``member`` (relative to the archive's root; a new one if absent), DEFLATE-compressed."""
    torch.save(state_dict, tmp / "plain.pt")
    path = tmp / "bomb.pt"
    with (
        zipfile.ZipFile(tmp / "plain.pt") as src,
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst,
    ):
        root = next(n for n in src.namelist() if n.endswith("/data.pkl"))[: -len("data.pkl")]
        for name in src.namelist():
            if name != root + member:
                dst.writestr(name, src.read(name), compress_type=zipfile.ZIP_STORED)
        with dst.open(root + member, "w", force_zip64=True) as out:
            if root + member in src.namelist():
                out.write(src.read(root + member))
            for _ in range(mib):
                out.write(bytes(2**20))
    (tmp / "plain.pt").unlink()
    return path


def zip_bomb_pickle(state_dict: dict, tmp: Path) -> Path:
    """A real checkpoint whose data.pkl is followed by 80 MiB of zeros (a 0.4 MiB member; unpickling stops
    at the pickle's STOP, so torch.load reads it fine after inflating it all)."""
    return _bomb(state_dict, tmp, "data.pkl", 80)


def zip_bomb_record(state_dict: dict, tmp: Path) -> Path:
    """A small checkpoint with one more record that inflates to 300 MiB of zeros from 1.3 MiB."""
    return _bomb(OrderedDict(list(state_dict.items())[:3]), tmp, "data/999", 300)


def with_conv(state_dict: dict, value: Callable[[torch.Tensor], torch.Tensor]) -> OrderedDict:
    out = OrderedDict(state_dict)
    out[CONV] = value(state_dict[CONV])
    return out


def with_metadata(state_dict: dict, metadata: object) -> OrderedDict:
    out = OrderedDict(state_dict)
    out._metadata = metadata  # type: ignore[attr-defined]
    return out


def _torch(obj_of: Callable[[dict], object], name: str = "in.pt", **save: object) -> Callable[[dict, Path], Path]:
    def make(state_dict: dict, tmp: Path) -> Path:
        torch.save(obj_of(state_dict), tmp / name, **save)
        return tmp / name

    return make


def _safetensors(metadata: dict, value: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Callable:
    def make(state_dict: dict, tmp: Path) -> Path:
        save_file(dict(with_conv(state_dict, value)), tmp / "in.safetensors", metadata=metadata)
        return tmp / "in.safetensors"

    return make


def _evil_protocol_4(state_dict: dict, tmp: Path) -> Path:
    torch.save({"state_dict": state_dict, "x": _Marker(str(tmp / "marker"))}, tmp / "in.pt", pickle_protocol=4)
    return tmp / "in.pt"


def _real_metadata(state_dict: dict) -> dict:
    return dict(state_dict._metadata)  # type: ignore[attr-defined]


# case: (make the file, message in the one Error line)
REFUSED: dict[str, tuple[Callable[[dict, Path], Path], str]] = {
    "safetensors record not JSON": (
        _safetensors({"wsconvert": "{not json"}), "'wsconvert' is '{not json', which is not JSON"
    ),
    "safetensors record a JSON list": (
        _safetensors({"wsconvert": "[1, 2]"}), "is a list ([1, 2]), which is not a wsconvert record"
    ),
    "safetensors conv weight int64": (_safetensors({}, lambda t: t.long()), f"{CONV} is a strided torch.int64 tensor"),
    "safetensors conv weight bool": (_safetensors({}, lambda t: t > 0), f"{CONV} is a strided torch.bool tensor"),
    "conv weight bool": (
        _torch(lambda sd: with_conv(sd, lambda t: t > 0)), "torch.bool tensor of shape [16, 3, 3, 3], but"
    ),
    "conv weight int64": (_torch(lambda sd: with_conv(sd, lambda t: t.long())), "keeps torch.float32 values there"),
    "conv weight complex64": (
        _torch(lambda sd: with_conv(sd, lambda t: t.to(torch.complex64))), "torch.complex64"
    ),
    "conv weight sparse": (
        _torch(lambda sd: with_conv(sd, lambda t: t.to_sparse())), "(sparse); wsconvert rewrites dense"
    ),
    "conv weight quantized": (
        _torch(lambda sd: with_conv(sd, lambda t: torch.quantize_per_tensor(t, 0.01, 0, torch.qint8))),
        "store value.dequantize()",
    ),
    "_metadata an int": (_torch(lambda sd: with_metadata(sd, 5)), "its _metadata is a int (5)"),
    "_metadata a str": (_torch(lambda sd: with_metadata(sd, "v1")), "its _metadata is a str ('v1')"),
    "_metadata int keys": (
        _torch(lambda sd: with_metadata(sd, {0: {"version": 1}})), "_metadata has the key a int (0)"
    ),
    "_metadata entry not a dict": (
        _torch(lambda sd: with_metadata(sd, {**_real_metadata(sd), "features": 3})),
        "_metadata['features'] is a int (3)",
    ),
    "record entry holds a tensor": (
        _torch(lambda sd: {"state_dict": sd, "wsconvert": {"version": "0.1", "options": {"gn": torch.ones(2)}}}),
        "its entry 'wsconvert' is a dict",
    ),
    "record entry is a tensor": (
        _torch(lambda sd: {"state_dict": sd, "wsconvert": torch.ones(2)}), "is a strided torch.float32"
    ),
    "_metadata record holds a tensor": (
        _torch(lambda sd: with_metadata(sd, {**_real_metadata(sd), "__wsconvert__": {"version": torch.ones(1)}})),
        "its _metadata['__wsconvert__'] is a dict",
    ),
    "zip bomb: data.pkl inflates to 80 MiB": (zip_bomb_pickle, "would inflate to 80.0 MiB"),
    "zip bomb: a record inflates to 300 MiB": (zip_bomb_record, "compressed members would inflate to 300.0 MiB"),
    "protocol 4 pickle running code": (_evil_protocol_4, "runs code from the file"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line(state_dict: dict, tmp_path: Path, case: str) -> None:
    make, message = REFUSED[case]
    path = make(state_dict, tmp_path)
    assert_refused(path, message)
    assert not (tmp_path / "marker").exists()


# --- legal files: the values torch.load returns ---------------------------------------------------------


def _numpy_metrics(state_dict: dict, tmp: Path) -> Path:
    metrics = {name: np.dtype(name).type(3) for name in ("uint8", "int16", "uint64", "complex64", "float32", "bool")}
    torch.save({"state_dict": state_dict, "metrics": metrics}, tmp / "in.pt")
    return tmp / "in.pt"


def _numpy1_metric(state_dict: dict, tmp: Path) -> Path:
    module = types.ModuleType("numpy1_pickle")
    module.Pickler = _Numpy1Pickler  # type: ignore[attr-defined]
    torch.save({"state_dict": state_dict, "metric": np.float64(0.25)}, tmp / "in.pt", pickle_module=module)
    with zipfile.ZipFile(tmp / "in.pt") as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"numpy.core.multiarray\nscalar" in pickled and b"numpy._core" not in pickled
    return tmp / "in.pt"


def _rezipped(compression: int) -> Callable[[dict, Path], Path]:
    return lambda sd, tmp: rezip(_torch(lambda s: s, "a.pt")(sd, tmp), tmp / "in.pt", compression)


# case: (make the file, whether the tensors may be memory-mapped)
LEGAL: dict[str, tuple[Callable[[dict, Path], Path], bool]] = {
    "re-zipped with DEFLATE": (_rezipped(zipfile.ZIP_DEFLATED), False),
    "re-zipped stored, unaligned": (_rezipped(zipfile.ZIP_STORED), False),
    "big-endian": (lambda sd, tmp: save_big_endian(sd, tmp / "in.pt"), True),
    "pickle protocol 4": (_torch(lambda s: s, pickle_protocol=4), True),
    "pickle protocol 5, training checkpoint": (_torch(lambda s: {"model": s, "epoch": 3}, pickle_protocol=5), True),
    "legacy format, protocol 4": (_torch(lambda s: s, pickle_protocol=4, _use_new_zipfile_serialization=False), False),
    "numpy 2 scalars of six dtypes": (_numpy_metrics, True),
    "numpy 1.x scalar name": (_numpy1_metric, True),
}  # fmt: skip


def _model_state(obj: object) -> dict:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj:
            return obj[key]
    return obj


@pytest.mark.parametrize("case", list(LEGAL))
def test_legal_files_load_the_values_torch_load_returns(state_dict: dict, tmp_path: Path, case: str) -> None:
    make, mapped = LEGAL[case]
    path = make(state_dict, tmp_path)
    loaded = ckpt.load_checkpoint(path)
    assert loaded.mmap is mapped
    reference = torch.load(path, weights_only=False)  # no mmap: torch inflates, byteswaps, reads any protocol
    assert_same_tensors(_model_state(loaded.obj), _model_state(reference))
    assert_same_tensors(_model_state(loaded.obj), state_dict)
    if case.startswith("numpy"):
        metrics = {k: v for k, v in loaded.obj.items() if k != "state_dict"}
        assert metrics == {k: v for k, v in reference.items() if k != "state_dict"}


@pytest.mark.parametrize("bake", [False, True], ids=["", "bake"])
@pytest.mark.parametrize("case", ["re-zipped with DEFLATE", "big-endian", "pickle protocol 4"])
def test_legal_files_convert_like_the_plain_file(
    state_dict: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, bake: bool
) -> None:
    """The CLI output equals the plain file's; pages are released every 64 KiB instead of 64 MiB (issue 10.4)."""
    monkeypatch.setattr(ckpt, "RELEASE_EVERY_BYTES", 2**16)
    flags = ["--bake"] if bake else []
    torch.save(state_dict, tmp_path / "plain.pt")
    want = converted(tmp_path / "plain.pt", tmp_path / "plain.ws.pt", *flags)
    path = LEGAL[case][0](state_dict, tmp_path)
    before = digest(path)
    assert_same_tensors(converted(path, tmp_path / "out.pt", *flags), want)
    assert digest(path) == before


def test_trusted_whole_model_in_legacy_format_protocol_4(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    torch.save(model, tmp_path / "whole.pt", _use_new_zipfile_serialization=False, pickle_protocol=4)
    assert_refused(tmp_path / "whole.pt", "torch.nn.modules.container.Sequential")  # without --trust-pickle
    result = run(tmp_path / "whole.pt", "--trust-pickle", "--gn", 4, "-o", tmp_path / "out.pt")
    assert result.exit_code == 0, (result.output, result.exception)
    import wsconvert

    x = torch.randn(2, 3, 12, 12)
    assert_close(wsconvert.load(tmp_path / "out.pt").eval()(x), wsconvert.convert_model(model, gn=4).eval()(x))


# --- page release (issue 10.4) ---------------------------------------------------------------------------


def _modify_in_memory(loaded: ckpt.Loaded) -> None:
    with torch.no_grad():
        loaded.obj[CONV].mul_(2)


@pytest.mark.parametrize("case", ["big-endian", "modified in memory"])
def test_release_keeps_pages_that_differ_from_the_file(state_dict: dict, tmp_path: Path, case: str) -> None:
    if case == "big-endian":
        path = save_big_endian(state_dict, tmp_path / "in.pt")
        loaded = ckpt.load_checkpoint(path)
    else:
        torch.save(state_dict, tmp_path / "in.pt")
        path = tmp_path / "in.pt"
        loaded = ckpt.load_checkpoint(path)
        _modify_in_memory(loaded)
    values = {k: v.clone() for k, v in loaded.obj.items()}
    ckpt.release_mapped_pages(path)
    assert_same_tensors(loaded.obj, values)


def test_release_still_drops_pages_equal_to_the_file(state_dict: dict, tmp_path: Path) -> None:
    torch.save(state_dict, tmp_path / "in.pt")
    loaded = ckpt.load_checkpoint(tmp_path / "in.pt")
    _modify_in_memory(loaded)  # one tensor's pages become private copies; the rest still equal the file
    released = ckpt.release_mapped_pages(tmp_path / "in.pt")
    if sys.platform.startswith("linux"):
        assert released >= (tmp_path / "in.pt").stat().st_size // 2
    assert_close(loaded.obj[CONV], state_dict[CONV] * 2, rtol=0, atol=0)


# --- bounds (issue 10.15) --------------------------------------------------------------------------------


class _CountingSet(set):
    """A set that counts lookups and the characters looked up."""

    def __init__(self, items: set[str]) -> None:
        super().__init__(items)
        self.lookups = 0
        self.characters = 0

    def __contains__(self, key: object) -> bool:
        self.lookups += 1
        self.characters += len(key)  # type: ignore[arg-type]
        return super().__contains__(key)


@pytest.mark.parametrize("parts", [10, 40_000])
def test_match_prefix_is_linear_in_the_key_length(state_dict: dict, parts: int) -> None:
    expected = _CountingSet(set(state_dict))
    key = ".".join(["a"] * parts) + "." + CONV
    other = ".".join(["b"] * parts)  # matches nothing
    assert key_maps.match_prefix([key, other], expected) == (".".join(["a"] * parts) + ".", 1)
    most_parts = max(k.count(".") + 1 for k in expected)
    assert expected.lookups <= 2 * most_parts  # not one lookup per part
    assert expected.characters <= 2 * most_parts * max(map(len, expected))


def test_long_key_cli_error_is_one_short_line(state_dict: dict, tmp_path: Path) -> None:
    key = ".".join(["x"] * 40_000)
    torch.save(OrderedDict({**state_dict, key: torch.ones(1)}), tmp_path / "in.pt")
    assert_refused(tmp_path / "in.pt", "unexpected keys x.x.x.x")
    assert_refused(tmp_path / "in.pt", "x.x.x (79,999 characters)")  # the key, shortened
    result = run(tmp_path / "in.pt", *ARCH)
    assert len(result.stderr) < 1000


@pytest.mark.parametrize(
    ("bound", "value"), [("PICKLE_MAX_BYTES", 2**10), ("INFLATE_FREE_BYTES", 2**10), ("INFLATE_MAX_RATIO", 0)]
)
def test_bounds_are_the_documented_constants(
    state_dict: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bound: str, value: int
) -> None:
    """A DEFLATE re-zipped real checkpoint passes the default bounds and trips each one when it is lowered."""
    path = rezip(_torch(lambda s: s, "a.pt")(state_dict, tmp_path), tmp_path / "in.pt", zipfile.ZIP_DEFLATED)
    assert ckpt.load_checkpoint(path).kind == "state_dict"
    monkeypatch.setattr(archive_module, bound, value)
    if bound == "PICKLE_MAX_BYTES":
        monkeypatch.setattr(archive_module, "PICKLE_BYTES_PER_RECORD", 0)
    else:
        monkeypatch.setattr(
            archive_module, "INFLATE_MAX_RATIO" if bound != "INFLATE_MAX_RATIO" else "INFLATE_FREE_BYTES", 0
        )
    with pytest.raises(CheckpointError, match="would inflate to"):
        ckpt.load_checkpoint(path)


def test_scan_reads_only_the_directory(state_dict: dict, tmp_path: Path) -> None:
    """What inspect_zip reports for an ordinary torch.save file: mappable, little-endian, protocol 2."""
    torch.save(state_dict, tmp_path / "in.pt")
    layout = archive_module.inspect_zip(tmp_path / "in.pt")
    assert (layout.mappable, layout.byteorder, layout.protocol) == (True, "little", 2)
    assert layout.records == len({t.untyped_storage().data_ptr() for t in state_dict.values()})
