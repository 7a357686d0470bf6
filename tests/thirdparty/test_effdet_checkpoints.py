"""effdet train.py checkpoints (issue 13, point 9): written by timm's CheckpointSaver with ``unwrap_fn=unwrap_bench``
(rwightman/efficientdet-pytorch train.py), so ``arch`` is ``args.model`` (``efficientdet_d0``) and ``state_dict`` /
``state_dict_ema`` are the bare EfficientDet's. ``wsconvert ckpt --gn 32`` finds the effdet factory without
``--arch``; a name that resolves nowhere says that ``--arch`` overrides it; a name two libraries know is decided by
the checkpoint's keys."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from _thirdparty import needs

effdet = needs("effdet")

import pytest  # noqa: E402
import timm  # noqa: E402
import timm.utils  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner, Result  # noqa: E402
from effdet.config import model_config  # noqa: E402

import wsconvert  # noqa: E402
from wsconvert.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "efficientdet_d0"
GN = 32


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="wsconvert")


def assert_one_line_error(result: Result, *texts: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


def effdet_model(name: str = NAME, **kwargs: object) -> torch.nn.Module:
    return effdet.create_model(name, pretrained=False, pretrained_backbone=False, **kwargs)


def train_py_checkpoint(directory: Path, args: argparse.Namespace, **kwargs: object) -> tuple[Path, dict]:
    """What effdet's train.py writes: a DetBenchTrain model and its ModelEmaV2, saved by timm's CheckpointSaver with
    ``unwrap_fn=effdet.unwrap_bench``. The EMA weights differ from the model's, so a swapped entry would show."""
    bench = effdet.create_model(
        args.model, bench_task="train", pretrained=False, pretrained_backbone=False, **kwargs
    )  # fmt: skip
    with torch.no_grad():
        for module in bench.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    ema = timm.utils.ModelEmaV2(bench, decay=0.9)
    with torch.no_grad():
        for parameter in ema.module.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    optimizer = torch.optim.SGD(bench.parameters(), lr=0.1, momentum=0.9)
    directory.mkdir(parents=True, exist_ok=True)
    saver = timm.utils.CheckpointSaver(
        bench, optimizer, args=args, model_ema=ema, checkpoint_dir=str(directory), unwrap_fn=effdet.unwrap_bench
    )
    saver.save_checkpoint(epoch=0, metric=0.25)
    models = {"state_dict": effdet.unwrap_bench(bench), "state_dict_ema": effdet.unwrap_bench(ema)}
    return directory / "checkpoint-0.pth.tar", models


def detections(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        classes, boxes = model.eval()(x)
    return [*classes, *boxes]


CASES = {
    "defaults": (argparse.Namespace(model=NAME, num_classes=None, redundant_bias=None, lr=0.1), {}),
    "num_classes and redundant_bias": (
        argparse.Namespace(model=NAME, num_classes=5, redundant_bias=True, lr=0.1),
        {"num_classes": 5, "redundant_bias": True},
    ),
}


@pytest.mark.parametrize(("args", "kwargs"), CASES.values(), ids=CASES.keys())
def test_train_py_checkpoint_converts_without_arch(tmp_path: Path, args: argparse.Namespace, kwargs: dict) -> None:
    path, models = train_py_checkpoint(tmp_path / "train", args, **kwargs)
    saved = torch.load(path, weights_only=False)
    assert saved["arch"] == NAME and not any(k.startswith("model.") for k in saved["state_dict"])  # the bare model
    out = tmp_path / "out.pth"
    result = run(path, "--gn", GN, "-o", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"architecture effdet:{NAME} taken from the checkpoint" in result.output
    converted = torch.load(out, weights_only=False)
    assert converted["wsconvert"]["arch_kwargs"] == kwargs
    x = torch.randn(1, 3, 512, 512)  # the config's image_size: the BiFPN resamples to sizes computed from it
    for entry, original in models.items():
        model = wsconvert.convert_model(effdet_model(**kwargs), gn=GN)
        model.load_state_dict(converted[entry], strict=True)
        reference = wsconvert.convert_model(copy.deepcopy(original), gn=GN)
        for got, want in zip(detections(model, x), detections(reference, x), strict=True):
            torch.testing.assert_close(got, want)
    loaded = wsconvert.load(out)  # the main entry, rebuilt from the recorded effdet spec, kwargs and options
    reference = wsconvert.convert_model(copy.deepcopy(models["state_dict"]), gn=GN)
    for got, want in zip(detections(loaded, x), detections(reference, x), strict=True):
        torch.testing.assert_close(got, want)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = argparse.Namespace(model=NAME, num_classes=None, redundant_bias=None)
    return train_py_checkpoint(tmp_path_factory.mktemp("effdet"), args)[0]


def renamed_arch(checkpoint: Path, directory: Path, arch: str, state_dict: dict | None = None) -> Path:
    saved = torch.load(checkpoint, weights_only=False)
    saved["arch"] = saved["args"].model = arch
    if state_dict is not None:
        saved["state_dict"] = state_dict
        del saved["state_dict_ema"]
    torch.save(saved, directory / f"{arch}.pth.tar")
    return directory / f"{arch}.pth.tar"


def test_unresolved_name_says_arch_overrides_it(checkpoint: Path, tmp_path: Path) -> None:
    path = renamed_arch(checkpoint, tmp_path, "efficientdet_d9")
    assert_one_line_error(
        run(path, "--gn", GN, "-o", tmp_path / "out.pth"),
        "the checkpoint names its architecture 'efficientdet_d9' (its 'arch' entry",
        "which is not a timm model nor an effdet model (did you mean efficientdet_d",
        "--arch overrides the name the checkpoint gives: pass --arch torchvision:NAME, timm:NAME, effdet:NAME",
        "package.module:callable",
    )
    assert not (tmp_path / "out.pth").exists()
    result = run(path, "--arch", f"effdet:{NAME}", "--gn", GN, "-o", tmp_path / "out.pth")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "taken from the checkpoint" not in result.output


def test_bench_state_dict_with_arch(tmp_path: Path) -> None:
    """A DetBenchTrain's own state_dict() (keys ``model.*`` plus the anchors buffer) with --arch effdet:NAME."""
    bench = effdet.create_model(NAME, bench_task="train", pretrained=False, pretrained_backbone=False)
    torch.save(bench.state_dict(), tmp_path / "bench.pt")
    result = run(tmp_path / "bench.pt", "--arch", f"effdet:{NAME}", "--gn", GN, "-o", tmp_path / "out.pt")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "key prefix 'model.'" in result.output and "kept as is (outside the model): anchors.boxes" in result.output
    out = torch.load(tmp_path / "out.pt")
    model = wsconvert.convert_model(effdet_model(), gn=GN)
    model.load_state_dict({k[len("model.") :]: v for k, v in out.items() if k.startswith("model.")}, strict=True)


@pytest.mark.parametrize(
    ("arch", "factory", "spec"),
    [
        ("resnet18", "effdet", "effdet:resnet18"),
        ("resnet18", "timm", "timm:resnet18"),
        ("resnet18", "neither", None),
    ],
)
def test_a_name_both_libraries_know_is_decided_by_the_keys(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, factory: str, spec: str | None
) -> None:
    """timm and effdet share no model name today; effdet's registry gets a ``resnet18`` (the d0 config), so the
    checkpoint's name means two models and only its keys can tell which."""
    monkeypatch.setitem(model_config.efficientdet_model_param_dict, arch, {
        **model_config.efficientdet_model_param_dict[NAME], "name": arch
    })  # fmt: skip
    state_dict = {
        "effdet": None,
        "timm": timm.create_model(arch, pretrained=False).state_dict(),
        "neither": {"conv.weight": torch.zeros(2, 3, 1, 1)},
    }[factory]
    path = renamed_arch(checkpoint, tmp_path, arch, state_dict)
    result = run(path, "--gn", GN, "-o", tmp_path / "out.pth")
    if spec is None:
        assert_one_line_error(
            result,
            "the checkpoint's 'arch' entry 'resnet18' names timm:resnet18 and effdet:resnet18, and its state dict "
            "matches neither of them; pass --arch to say which",
        )
        return
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"architecture {spec} taken from the checkpoint" in result.output
