"""``wsconvert --skip-unnormalized`` and ``--input-shape`` (the unnormalized-conv probe on the command line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner, Result
from torch import nn
from torch.nn.utils import parametrize

from wsconvert import convert_model
from wsconvert.cli import main

TIMM_ARGS = ["--arch", "timm:mobilenetv3_small_050", "--arch-kwargs", '{"num_classes": 10}']


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="wsconvert")


class Untraceable(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it); ``head`` is an output conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            y = y.relu()
        return self.head(y)


class TwoInputs(Untraceable):
    """Untraceable and takes two arguments: neither a synthetic input nor --input-shape can run it."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x * scale)


UNTRACEABLE_ARGS = ["--arch", f"{__name__}:Untraceable"]
TWO_INPUTS_ARGS = ["--arch", f"{__name__}:TwoInputs"]


@pytest.fixture
def timm_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "mnv3.pt"
    torch.save(timm.create_model("mobilenetv3_small_050", num_classes=10).state_dict(), path)
    return path


@pytest.fixture
def untraceable_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "untraceable.pt"
    torch.save(Untraceable().state_dict(), path)
    return path


def test_skip_unnormalized_skips_se_convs_and_output_loads(timm_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    result = run(timm_checkpoint, *TIMM_ARGS, "--gn", "8", "--skip-unnormalized", "--json", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert report["options"]["skip_unnormalized"] is True
    flagged = {u["path"] for u in report["unnormalized"]}
    se = {p for p in flagged if p.endswith(("se.conv_reduce", "se.conv_expand"))}
    assert se and report["unnormalized_detection"] == "torch.fx trace"
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert se <= set(skipped)
    assert all(skipped[p].startswith("output feeds no normalization layer") for p in se)

    # the written state dict loads strictly into the same conversion done in Python
    model = convert_model(timm.create_model("mobilenetv3_small_050", num_classes=10), gn=8, skip_unnormalized=True)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    reduce = model.get_submodule(sorted(se)[0])
    assert not parametrize.is_parametrized(reduce)


def test_without_the_flag_the_report_still_lists_them(timm_checkpoint: Path) -> None:
    result = run(timm_checkpoint, *TIMM_ARGS, "--gn", "8", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "Output feeds no normalization layer (found by torch.fx trace):" in result.stdout
    assert "output feeds no normalization layer (" not in result.stdout  # nothing skipped for it


@pytest.fixture
def two_inputs_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "two_inputs.pt"
    torch.save(TwoInputs().state_dict(), path)
    return path


def test_input_shape_lets_the_probe_run_an_untraceable_model(
    untraceable_checkpoint: Path, two_inputs_checkpoint: Path
) -> None:
    base = [untraceable_checkpoint, *UNTRACEABLE_ARGS, "--gn", "4", "--skip-unnormalized", "--dry-run", "--json"]
    with_shape = run(*base, "--input-shape", "1,3,16,16")
    assert with_shape.exit_code == 0, with_shape.output
    report = json.loads(with_shape.stdout)["report"]
    assert report["unnormalized_detection"].startswith("forward hooks on the example input")
    assert [u["path"] for u in report["unnormalized"]] == ["head"]
    assert {s["path"] for s in report["skipped"]} == {"head"}

    synthetic = run(*base)  # fx fails, no input: the probe runs on an input built from the model (issue 13, point 3)
    assert synthetic.exit_code == 0, synthetic.output
    assert not [line for line in synthetic.stderr.splitlines() if line.startswith("Warning: ")], synthetic.stderr
    report = json.loads(synthetic.stdout)["report"]
    assert report["unnormalized_detection"].startswith("forward hooks on a synthetic input of shape (1, 3, 224, 224)")
    assert {s["path"] for s in report["skipped"]} == {"head"}
    assert [h["kind"] for h in report["hints"]] == ["probe_synthetic"]

    without = run(two_inputs_checkpoint, *TWO_INPUTS_ARGS, *base[3:])  # nothing can run it: unavailable, no crash
    assert without.exit_code == 0, without.output
    # said once, as the CLI's own Warning: line (not also in Python's warning format)
    warnings = [line for line in without.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == 1 and "skipped nothing" in warnings[0], without.stderr
    assert "synthetic input" in warnings[0] and "--input-shape" in warnings[0]
    assert "UserWarning" not in without.stderr
    report = json.loads(without.stdout)["report"]
    assert report["unnormalized_detection"].startswith("unavailable: torch.fx cannot trace")
    assert "--input-shape" in report["unnormalized_detection"]
    assert report["skipped"] == []
    assert any("skip_unnormalized=True skipped nothing" in note for note in report["notes"])


@pytest.mark.parametrize("shape", ["", "1,3,x,16", "1,0,16,16", "1,,3", "-1,3"])
def test_bad_input_shape_is_a_usage_error(untraceable_checkpoint: Path, shape: str) -> None:
    result = run(untraceable_checkpoint, *UNTRACEABLE_ARGS, "--input-shape", shape, "--dry-run")
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--input-shape'" in result.stderr
    assert "comma-separated positive integers" in result.stderr
    assert "Traceback" not in result.output


def test_wrong_input_shape_is_reported_not_raised(untraceable_checkpoint: Path) -> None:
    result = run(
        untraceable_checkpoint, *UNTRACEABLE_ARGS, "--skip-unnormalized", "--input-shape", "1,5,16,16", "--dry-run"
    )
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert warnings and all("UserWarning" not in line for line in result.stderr.splitlines()), result.stderr
    assert any("skipped nothing" in line for line in warnings), result.stderr
    assert "forward pass on example_inputs failed (RuntimeError" in result.stdout
