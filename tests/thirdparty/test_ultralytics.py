"""ultralytics YOLO models (issue 13, points 4-6): the frozen DFL conv, predict / val / export / train of a converted
model (wsconvert.integrations.ultralytics), ultralytics' own checkpoint files through the command line.

Real yolov8n / yolo11n models built from their yaml (random weights, nothing downloaded), a synthetic dataset of a
few random 64x64 images written in tmp_path, CPU, offline (YOLO_OFFLINE, a private YOLO_CONFIG_DIR).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from copy import deepcopy
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported: no update checks, no downloads
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="wsconvert-yolo-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from _thirdparty import needs  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from torch import nn  # noqa: E402

ultralytics = needs("ultralytics")
cv2 = needs("cv2")

import wsconvert  # noqa: E402
from wsconvert.cli import main  # noqa: E402
from wsconvert.errors import CheckpointError, InvalidOptionError  # noqa: E402
from wsconvert.integrations import ultralytics as wsu  # noqa: E402
from wsconvert.rules.conv import FROZEN_REASON  # noqa: E402

YOLO = ultralytics.YOLO
DFL = "model.22.dfl.conv"  # yolov8n's DFL conv (yolo11n: model.23)
TRAIN = {"epochs": 1, "imgsz": 64, "batch": 2, "workers": 0, "device": "cpu", "plots": False, "amp": False}
TRAIN |= {"mosaic": 0.0, "verbose": False, "exist_ok": True, "val": True}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A detection dataset in YOLO format: 4 train and 2 val random 64x64 images, one box each."""
    root = tmp_path_factory.mktemp("yolo-data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
            (root / "labels" / split / f"{i}.txt").write_text(f"0 0.5 0.5 0.{3 + i} 0.4\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: thing\n")
    return root / "data.yaml"


def _yolo(cfg: str = "yolov8n.yaml") -> object:
    torch.manual_seed(0)
    return YOLO(cfg)


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)[0]


def _set_running_statistics(model: nn.Module, x: torch.Tensor) -> None:
    """BatchNorm running statistics of one training-mode pass on ``x`` (momentum 1)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
    for m in norms:
        m.momentum = 0.1


def _converted_like_ultralytics(model: nn.Module, **options: object) -> nn.Module:
    """``convert_model`` of a copy with the trainability ultralytics' trainer gives (the saved model is frozen)."""
    model = deepcopy(model).float()
    with wsu.trainable_as_ultralytics_trains(model):
        return wsconvert.convert_model(model, **options, inplace=True)


def _norm_types(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}


def _standardized_paths(model: nn.Module) -> set[str]:
    return {path for path, m in model.named_modules() if wsconvert.is_standardized(m)}


# --- point 4: frozen conv weights --------------------------------------------------------------------------------


@pytest.mark.parametrize(("cfg", "dfl"), [("yolov8n.yaml", DFL), ("yolo11n.yaml", "model.23.dfl.conv")])
def test_frozen_dfl_conv_is_skipped_with_the_reason_unless_asked(cfg: str, dfl: str) -> None:
    model = _yolo(cfg).model
    assert not model.get_submodule(dfl).weight.requires_grad
    report = wsconvert.plan_conversion(model, gn=32)
    assert [(s.path, s.reason) for s in report.skipped] == [(dfl, FROZEN_REASON)]
    converted = wsconvert.convert_model(model, gn=32)
    assert dfl not in _standardized_paths(converted)
    torch.testing.assert_close(converted.get_submodule(dfl).weight, torch.arange(16.0).view(1, 16, 1, 1))
    forced = wsconvert.convert_model(model, gn=32, standardize_frozen=True)
    assert _standardized_paths(forced) == _standardized_paths(converted) | {dfl}


def test_a_loaded_checkpoint_is_frozen_but_convert_yolo_plans_with_training_trainability(tmp_path: Path) -> None:
    """ultralytics saves every module frozen (strip_optimizer, ModelEMA); convert_yolo still standardizes all convs
    but the DFL one."""
    _stripped_checkpoint(tmp_path / "plain.pt")
    loaded = YOLO(tmp_path / "plain.pt")
    assert not any(p.requires_grad for p in loaded.model.parameters())
    plain = wsconvert.plan_conversion(loaded.model, gn=32)  # the library alone: every conv is frozen
    assert plain.summary()["standardized"] == 0 and all(s.reason == FROZEN_REASON for s in plain.skipped)
    report = wsu.convert_yolo(loaded, gn=32)
    assert [s.path for s in report.skipped] == [DFL] and report.summary()["standardized"] == 63
    assert not any(p.requires_grad for p in loaded.model.parameters())  # the flags are put back


# --- point 5: predict, fuse, pickle, val, export, train ------------------------------------------------------------

OPTIONS = {
    "gn=32": {"gn": 32},
    "WS only": {},
    "bcn": {"gn": 16, "norm": "bcn"},
    "preserve": {"gn": 32, "preserve": True},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_fuse_bakes_ws_keeps_group_norm_and_computes_the_same(options: dict) -> None:
    """ultralytics' fuse crashed on GroupNorm ('no attribute running_mean') and, with gn=None, on the parametrized
    weight; the converted model's fuse bakes WS, folds BatchNorms, keeps GroupNorms after their conv."""
    yolo = _yolo()
    wsu.convert_yolo(yolo, **options)
    x = torch.randn(2, 3, 64, 64)
    _set_running_statistics(yolo.model, x)  # random BatchNorm statistics on WS convs overflow to inf in eval
    expected = _outputs(yolo.model, x)
    assert torch.isfinite(expected).all()
    fused = yolo.model.fuse(verbose=False)
    assert fused is yolo.model and fused.is_fused() and not _standardized_paths(fused)
    loose = [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(loose) == (57 if options.get("norm") == "bcn" else 0)  # only the BatchNorm parts of baked BCNs
    assert ("GroupNorm" in _norm_types(fused)) == ("gn" in options)
    scale = expected.abs().max().item()  # boxes in pixels; WS-only BatchNorm folding rounds differently
    torch.testing.assert_close(_outputs(fused, x), expected, rtol=1e-4, atol=1e-4 * scale)


def test_predict_runs_on_a_numpy_image_and_leaves_the_model_converted() -> None:
    yolo = _yolo()
    wsu.convert_yolo(yolo, gn=32)
    results = yolo.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, device="cpu", verbose=False)
    assert len(results) == 1 and results[0].boxes is not None
    assert wsconvert.is_standardized(yolo.model.model[0].conv) and "GroupNorm" in _norm_types(yolo.model)


@pytest.mark.parametrize("options", [{"gn": 32}, {"gn": 32, "preserve": True}], ids=["gn=32", "preserve"])
def test_converted_model_pickles_and_loads_back_converted(tmp_path: Path, options: dict) -> None:
    """torch refuses to pickle parametrized modules; the converted convs pickle as plain conv + WS settings."""
    yolo = _yolo()
    wsu.convert_yolo(yolo, **options)
    x = torch.randn(1, 3, 64, 64)
    expected = _outputs(yolo.model, x)
    torch.save({"model": yolo.model}, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)["model"]
    assert _standardized_paths(loaded) == _standardized_paths(yolo.model)
    assert wsu.conversion_record(loaded) == wsu.conversion_record(yolo.model)
    torch.testing.assert_close(_outputs(loaded, x), expected, rtol=0, atol=0)
    assert dict(loaded.state_dict()).keys() == dict(yolo.model.state_dict()).keys()
    copy = deepcopy(loaded)  # deepcopy (ModelEMA, predict) keeps working, and the copy pickles too
    torch.save(copy, tmp_path / "copy.pt")
    torch.testing.assert_close(_outputs(torch.load(tmp_path / "copy.pt", weights_only=False), x), expected)


def test_val_and_onnx_export_of_a_converted_model(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnxruntime = needs("onnxruntime")
    monkeypatch.chdir(tmp_path)  # export writes next to the model's name (yolov8n.onnx), i.e. in the cwd
    yolo = _yolo()
    wsu.convert_yolo(yolo, gn=32)
    metrics = yolo.val(
        data=str(data), imgsz=64, batch=2, device="cpu", plots=False, verbose=False, project=str(tmp_path)
    )
    assert 0.0 <= metrics.box.map <= 1.0
    assert wsconvert.is_standardized(yolo.model.model[0].conv)  # val fused a copy
    x = torch.rand(1, 3, 64, 64)
    expected = _outputs(wsu.fuse(deepcopy(yolo.model), verbose=False), x)
    path = yolo.export(format="onnx", imgsz=64, device="cpu", simplify=False)
    session = onnxruntime.InferenceSession(path)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-3, atol=2e-2)  # boxes in pixels (0-64)
    script = yolo.export(format="torchscript", imgsz=64, device="cpu")
    torch.testing.assert_close(torch.jit.load(script)(x), expected, rtol=1e-4, atol=1e-3)


class _Captured:
    """A trainer callback recording the model the trainer trains and its weights at the start."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.start: dict[str, torch.Tensor] = {}

    def __call__(self, trainer: object) -> None:
        self.model = trainer.model
        self.start = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _trained(yolo: object, data: Path, project: Path) -> _Captured:
    captured = _Captured()
    yolo.add_callback("on_pretrain_routine_end", captured)
    yolo.train(data=str(data), project=str(project), name="run", **TRAIN)
    return captured


def _assert_trained_converted(captured: _Captured) -> None:
    model = captured.model
    assert "BatchNorm2d" not in _norm_types(model) and "GroupNorm" in _norm_types(model)
    assert len(_standardized_paths(model)) == 63 and DFL not in _standardized_paths(model)
    end = model.state_dict()
    key = "model.0.conv.parametrizations.weight.original"
    assert not torch.equal(end[key], captured.start[key])  # the converted weights are what trained


def test_train_trains_the_converted_model_and_saves_loadable_checkpoints(tmp_path: Path, data: Path) -> None:
    yolo = _yolo()
    wsu.convert_yolo(yolo, gn=32)
    captured = _trained(yolo, data, tmp_path)
    _assert_trained_converted(captured)
    weights = tmp_path / "run" / "weights"
    for name in ("last.pt", "best.pt"):  # written by ultralytics' save_model, then strip_optimizer
        reloaded = YOLO(weights / name)
        assert wsu.is_converted(reloaded.model) and len(_standardized_paths(reloaded.model)) == 63
    assert wsu.is_converted(yolo.model)  # YOLO.train reloads best.pt into the object

    again = YOLO(weights / "last.pt")  # a converted file: attach, then train from it
    wsu.attach(again)
    captured = _trained(again, data, tmp_path / "again")
    _assert_trained_converted(captured)


def test_without_the_hook_ultralytics_trains_a_plain_model(tmp_path: Path, data: Path) -> None:
    """Why convert_yolo registers the hook: the trainer rebuilds the model from its yaml."""
    yolo = _yolo()
    yolo.model = wsconvert.convert_model(yolo.model, gn=32)
    captured = _trained(yolo, data, tmp_path)
    assert "BatchNorm2d" in _norm_types(captured.model) and not _standardized_paths(captured.model)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda y: wsu.convert_yolo(y, gn=0), "gn=0 must be an integer >= 1"),
        (lambda y: wsu.convert_yolo(y, gnn=32), "unknown conversion option 'gnn'"),
        (lambda y: wsu.attach(y), "was not converted by wsconvert"),
        (lambda y: wsu.attach(y.model), "attach\\(\\) takes an ultralytics YOLO object"),
        (lambda y: wsu.convert_yolo(object()), "neither an ultralytics YOLO object"),
        (lambda y: [wsu.convert_yolo(y, gn=32), wsu.convert_yolo(y, gn=32)], "is already converted"),
    ],
    ids=["bad gn", "unknown option", "attach unconverted", "attach a module", "not a model", "twice"],
)
def test_bad_calls_are_refused_naming_the_problem(call: object, message: str) -> None:
    yolo = _yolo()
    before = {k: v.clone() for k, v in yolo.model.state_dict().items()}
    with pytest.raises(InvalidOptionError, match=message):
        call(yolo)
    if "twice" not in message and "already" not in message:
        assert not wsu.is_converted(yolo.model)
        torch.testing.assert_close(dict(yolo.model.state_dict()), before)


# --- point 6: ultralytics checkpoint files through the command line ---------------------------------------------


def _training_checkpoint(path: Path) -> nn.Module:
    """The dict ultralytics' save_model writes: ema (half, frozen), model None, optimizer, updates, train_args..."""
    model = _yolo().model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ema = deepcopy(model).half().requires_grad_(False)
    torch.save(
        {"epoch": 0, "best_fitness": None, "model": None, "ema": ema, "updates": 3,
         "optimizer": optimizer.state_dict(), "train_args": {"model": "yolov8n.yaml", "imgsz": 64},
         "date": "2026-12-03T00:00:00", "version": ultralytics.__version__},
        path,
    )  # fmt: skip
    return ema


def _stripped_checkpoint(path: Path) -> nn.Module:
    """The same after ultralytics' strip_optimizer (what final_eval leaves): model = ema, optimizer None."""
    from ultralytics.utils.torch_utils import strip_optimizer

    ema = _training_checkpoint(path)
    strip_optimizer(path)
    return ema


CHECKPOINTS = {"training": _training_checkpoint, "stripped": _stripped_checkpoint}


def _cli(*args: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_cli_converts_ultralytics_checkpoints_consistently(tmp_path: Path, kind: str) -> None:
    source = tmp_path / "last.pt"
    ema = CHECKPOINTS[kind](source)
    before = torch.load(source, weights_only=False)
    result = _cli(source, "--trust-pickle", "--gn", "32")
    assert result.exit_code == 0, result.output
    out = torch.load(tmp_path / "last.ws.pt", weights_only=False)
    modules = [k for k, v in before.items() if isinstance(v, nn.Module)]
    assert "optimizer" not in out and "dropped: 'optimizer'" in result.output
    assert set(out) == (set(before) - {"optimizer"}) | {"wsconvert"} and out["wsconvert"]["modules"] == modules
    x = torch.randn(1, 3, 64, 64)
    expected = _outputs(_converted_like_ultralytics(ema, gn=32), x)
    for key in modules:  # model and ema alike
        assert len(_standardized_paths(out[key])) == 63 and DFL not in _standardized_paths(out[key])
        assert out[key].model[0].conv.parametrizations.weight.original.dtype == torch.float16  # kept as saved
        torch.testing.assert_close(_outputs(out[key].float(), x), expected)
    yolo = YOLO(tmp_path / "last.ws.pt")
    assert wsu.is_converted(yolo.model)
    assert yolo.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, device="cpu", verbose=False)
    assert wsu.is_converted(wsconvert.load(tmp_path / "last.ws.pt"))
    again = _cli(tmp_path / "last.ws.pt", "--trust-pickle", "--gn", "32", "-o", tmp_path / "again.pt")
    assert again.exit_code == 1 and "already converted" in again.stderr


def test_cli_output_trains_with_attach(tmp_path: Path, data: Path) -> None:
    _stripped_checkpoint(tmp_path / "best.pt")
    assert _cli(tmp_path / "best.pt", "--trust-pickle", "--gn", "32").exit_code == 0
    yolo = YOLO(tmp_path / "best.ws.pt")
    wsu.attach(yolo)
    _assert_trained_converted(_trained(yolo, data, tmp_path / "runs"))


def test_cli_bake_writes_a_fused_model_that_needs_no_wsconvert(tmp_path: Path) -> None:
    _stripped_checkpoint(tmp_path / "best.pt")
    result = _cli(tmp_path / "best.pt", "--trust-pickle", "--gn", "32", "--bake")
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(tmp_path / "best.ws.pt") as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"wsconvert." not in pickled  # only torch and ultralytics classes
    yolo = YOLO(tmp_path / "best.ws.pt")
    assert yolo.model.is_fused() and "GroupNorm" in _norm_types(yolo.model)
    assert yolo.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, device="cpu", verbose=False)


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (_stripped_checkpoint, [], "--trust-pickle"),
        (lambda p: torch.save({"model": _yolo().model, "ema": _yolo("yolo11n.yaml").model}, p), ["--trust-pickle"],
         "entries 'model' .* and 'ema' .* are not the same model"),
    ],
    ids=["untrusted pickle", "different models"],
)  # fmt: skip
def test_cli_refuses_bad_ultralytics_checkpoints(tmp_path: Path, make: object, args: list, message: str) -> None:
    make(tmp_path / "in.pt")
    result = _cli(tmp_path / "in.pt", *args, "--gn", "32")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert pytest.importorskip("re").search(message, " ".join(result.stderr.split()))
    assert not (tmp_path / "in.ws.pt").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_failed_write_is_not_retried_by_ultralytics_torch_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Importing ultralytics replaces ``torch.save`` with a wrapper that retries a failed save; wsconvert writes
    through ``torch.serialization.save``, so a full disk still fails the write and leaves nothing behind."""
    import errno

    from wsconvert.checkpoint import reader

    assert torch.save is not torch.serialization.save  # the patch this test is about is in place
    writes = {"n": 0}
    real_write = reader._Writer.write

    def full_disk_once(self: object, data: object) -> int:
        writes["n"] += 1
        if writes["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(reader._Writer, "write", full_disk_once)
    target = tmp_path / "out.pt"
    with pytest.raises(CheckpointError, match="No space left"):
        reader.write_torch({"w": torch.ones(3)}, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
