"""scripts/microbatch.py: the reproduction's machinery on a tiny budget (not its scientific claim)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from conftest import load_script
from torch import nn

import wsconvert

mb = load_script("microbatch")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    out = tmp_path_factory.mktemp("microbatch")
    png = out / "img" / "curves.png"
    returned = mb.main(["--quick", "--seeds", "2", "--epochs", "3", "--out", str(out), "--png", str(png)])
    return returned, out / "microbatch.json", png


def test_quick_run_writes_json_matching_the_returned_results(quick_run: tuple[dict, Path, Path]) -> None:
    returned, json_path, _ = quick_run
    written = json.loads(json_path.read_text())
    assert written == json.loads(json.dumps(returned))
    assert set(written) == {"config", "data", "conversion_reports", "machine", "runtime_s", "runs", "summary"}
    assert written["config"]["quick"] is True
    assert written["data"] == {"dataset": "sklearn.datasets.load_digits", "train": 256, "test": 450}


def test_quick_run_writes_a_png(quick_run: tuple[dict, Path, Path]) -> None:
    _, _, png = quick_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_combination_is_run_once_per_seed(quick_run: tuple[dict, Path, Path]) -> None:
    results, _, _ = quick_run
    combos = sorted((r["norm"], r["batch_size"], r["seed"]) for r in results["runs"])
    assert combos == sorted((n, b, s) for n in mb.NORMS for b in (2, 32) for s in (0, 1))
    for run in results["runs"]:
        assert run["steps"] == 3 * (256 // run["batch_size"])
        assert run["lr"] == pytest.approx(0.1 * run["batch_size"] / 32)


@pytest.mark.parametrize("key", ["train_loss", "test_loss", "test_acc_curve"])
def test_curves_have_one_finite_value_per_epoch(quick_run: tuple[dict, Path, Path], key: str) -> None:
    results, _, _ = quick_run
    for run in results["runs"]:
        assert len(run[key]) == 3
        assert all(math.isfinite(v) for v in run[key])


def test_training_loss_decreases_in_every_run(quick_run: tuple[dict, Path, Path]) -> None:
    results, _, _ = quick_run
    for run in results["runs"]:
        assert run["train_loss"][-1] < run["train_loss"][0], (run["norm"], run["batch_size"], run["seed"])
        assert run["test_acc"] == run["test_acc_curve"][-1]
        assert 0.0 <= run["test_acc"] <= 1.0


def test_summary_is_mean_and_sample_std_over_seeds(quick_run: tuple[dict, Path, Path]) -> None:
    results, _, _ = quick_run
    assert len(results["summary"]) == len(mb.NORMS) * 2
    for row in results["summary"]:
        accs = [
            r["test_acc"] for r in results["runs"] if (r["norm"], r["batch_size"]) == (row["norm"], row["batch_size"])
        ]
        assert row["n_seeds"] == 2
        assert row["test_acc_all"] == accs
        torch.testing.assert_close(row["test_acc_mean"], statistics.fmean(accs))
        torch.testing.assert_close(row["test_acc_std"], statistics.stdev(accs))


def test_conversion_reports_show_gn_without_ws_and_gn_with_ws(quick_run: tuple[dict, Path, Path]) -> None:
    results, _, _ = quick_run
    reports = results["conversion_reports"]
    n_convs = sum(isinstance(m, nn.Conv2d) for m in mb.SmallResNet(8).modules())
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in mb.SmallResNet(8).modules())
    assert reports["bn"] is None
    assert reports["gn"] == {"standardized": 0, "replaced": n_norms, "skipped": n_convs, "group_fallbacks": 0}
    assert reports["gn_ws"] == {"standardized": n_convs, "replaced": n_norms, "skipped": 0, "group_fallbacks": 0}


@pytest.mark.parametrize(
    ("norm", "norm_type", "standardized"),
    [("bn", nn.BatchNorm2d, False), ("gn", nn.GroupNorm, False), ("gn_ws", nn.GroupNorm, True)],
)
def test_build_variant_starts_every_variant_from_the_same_weights(
    norm: str, norm_type: type[nn.Module], standardized: bool
) -> None:
    base = mb.SmallResNet(8)
    model, _ = mb.build_variant(base, norm, groups=4)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert norms and all(type(m) is norm_type for m in norms)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(wsconvert.is_standardized(c) is standardized for c in convs)
    # every variant starts from the base model's parameters (conv weights before WS): paired per seed
    for path, base_module in base.named_modules():
        module = model.get_submodule(path)
        if isinstance(base_module, nn.Conv2d):
            weight = module.parametrizations.weight.original if standardized else module.weight
            torch.testing.assert_close(weight, base_module.weight)
        elif isinstance(base_module, (nn.BatchNorm2d, nn.Linear)):
            torch.testing.assert_close(module.weight, base_module.weight)
            torch.testing.assert_close(module.bias, base_module.bias)
    assert any(isinstance(m, nn.BatchNorm2d) for m in base.modules())  # the base model is left untouched


@pytest.mark.parametrize(
    ("scaling", "batch_size", "expected"),
    [("linear", 2, 0.1 * 2 / 32), ("linear", 32, 0.1), ("linear", 64, 0.2), ("none", 2, 0.1), ("none", 32, 0.1)],
)
def test_learning_rate_rule(scaling: str, batch_size: int, expected: float) -> None:
    config = mb.Config(base_lr=0.1, ref_batch=32, lr_scaling=scaling)
    torch.testing.assert_close(config.lr_for(batch_size), expected)


def test_unknown_norm_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown norm 'ln'"):
        mb.build_variant(mb.SmallResNet(8), "ln", groups=4)


def test_batch_larger_than_the_training_set_is_rejected() -> None:
    data = mb.load_digits_split(train_subset=4)
    model = mb.SmallResNet(8)
    with pytest.raises(ValueError, match="batch size 8 is larger than the 4 training images"):
        mb.train_one(model, data, batch_size=8, lr=0.01, config=mb.Config(epochs=1), seed=0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--epochs", "-1"], "--epochs must be >= 1"),
        (["--batch-sizes", "2", "0"], "--batch-sizes must all be >= 1"),
        (["--base-lr", "0"], "--base-lr must be > 0"),
        (["--lr-scaling", "sqrt"], "invalid choice"),
    ],
)
def test_bad_options_exit_with_a_message(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        mb.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_fixed_split_is_stratified_and_reproducible() -> None:
    first = mb.load_digits_split()
    second = mb.load_digits_split()
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)
    x_train, y_train, x_test, y_test = first
    assert x_train.shape == (1347, 1, 8, 8) and x_test.shape == (450, 1, 8, 8)
    assert torch.bincount(y_test, minlength=10).min() >= 40  # stratified: about 45 of every class
    torch.testing.assert_close(x_train.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
