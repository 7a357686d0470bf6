"""The report says what to do about what it found (issue 14, point 7).

Each hint appears exactly when its condition holds: unnormalized convs that are standardized (suggest
skip_unnormalized), GroupNorm fallbacks with one channel per group (that is InstanceNorm), a probe that ran on a
synthetic input (issue 13, point 3), a probe that could not run (why, and how to give it an input; a
ProbeUnavailableWarning in Python, a ``Warning:`` line from the CLI).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import wsconvert
from wsconvert.cli import main
from wsconvert.errors import ProbeUnavailableWarning

pytestmark = pytest.mark.usefixtures("one_thread")


class Plain(nn.Module):
    """conv -> BN -> conv head: the head's output is the model output (unnormalized)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)))


class AllNormalized(Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).mean((2, 3))


class Untraceable(Plain):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 1
        return self.head(self.bn(self.conv(x)))


class NeedsTwoInputs(Untraceable):
    """Untraceable and takes two arguments: the synthetic input (one tensor) cannot run it either."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x * scale)


def kinds(report: wsconvert.ConversionReport) -> list[str]:
    return [hint.kind for hint in report.hints]


CASES = [
    # id, model, plan_conversion kwargs, expected hint kinds
    ("unnormalized-head", Plain, {"gn": 32}, ["unnormalized"]),
    ("unnormalized-already-skipped", Plain, {"gn": 32, "skip_unnormalized": True}, []),
    ("all-normalized", AllNormalized, {"gn": 32}, []),
    ("one-channel-per-group", lambda: AllNormalized(16), {"gn": 32}, ["instance_norm"]),
    ("fallback-with-two-per-group", lambda: AllNormalized(48), {"gn": 32}, []),  # 48 channels -> 24 groups
    ("gn-divides", lambda: AllNormalized(64), {"gn": 16}, []),
    ("probe-synthetic", Untraceable, {}, ["unnormalized", "probe_synthetic"]),
    ("probe-synthetic-gn16", lambda: Untraceable(16), {"gn": 32}, ["unnormalized", "instance_norm", "probe_synthetic"]),
    ("probe-unavailable", NeedsTwoInputs, {}, ["probe_unavailable"]),
    ("probe-unavailable-gn16", lambda: NeedsTwoInputs(16), {"gn": 32}, ["instance_norm", "probe_unavailable"]),
    ("probe-with-input", Untraceable, {"input_shape": (1, 3, 8, 8)}, ["unnormalized"]),
]


@pytest.mark.parametrize(("build", "kwargs", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hint_appears_exactly_when_its_condition_holds(build, kwargs: dict, expected: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbeUnavailableWarning)
        report = wsconvert.plan_conversion(build(), **kwargs)
    assert kinds(report) == expected
    text = str(report)
    as_dict = report.to_dict()
    assert [h["kind"] for h in as_dict["hints"]] == expected
    json.dumps(as_dict)  # still JSON-serializable
    for hint in report.hints:  # the same hints in str() and to_dict()
        assert hint.message in text
        assert {"kind": hint.kind, "message": hint.message, "warning": hint.warning} in as_dict["hints"]
    assert ("What to do:" in text) == bool(expected)


def test_unnormalized_hint_says_what_to_do_and_counts() -> None:
    report = wsconvert.plan_conversion(Plain(), gn=32)
    (hint,) = report.hints
    assert "skip_unnormalized=True" in hint.message and "--skip-unnormalized" in hint.message
    assert hint.message.startswith("1 of 2 standardized conv(s)")
    assert "1 conv(s) are then standardized" in hint.message
    assert "not been measured" in hint.message and not hint.warning


def test_instance_norm_hint_names_layer_and_suggests_smaller_gn() -> None:
    report = wsconvert.plan_conversion(AllNormalized(16), gn=32)
    (hint,) = report.hints
    assert "InstanceNorm" in hint.message and "(bn)" in hint.message
    assert "gn=8" in hint.message  # 16 channels: 8 groups of 2
    converted = wsconvert.convert_model(AllNormalized(16), gn=8)
    assert converted.bn.num_groups == 8  # the suggestion is a real GroupNorm
    assert not wsconvert.plan_conversion(AllNormalized(16), gn=8).hints


def test_probe_hint_says_why_and_how_to_fix() -> None:
    with pytest.warns(ProbeUnavailableWarning) as caught:
        report = wsconvert.plan_conversion(NeedsTwoInputs())
    (hint,) = report.hints
    assert hint.warning
    assert "torch.fx cannot trace" in hint.message and "input_shape" in hint.message
    assert "synthetic input of shape (1, 3, 224, 224)" in hint.message and "failed (TypeError" in hint.message
    assert "skipped nothing" not in hint.message
    assert [str(w.message) for w in caught] == [hint.message]  # the warning is the hint, once
    with pytest.warns(ProbeUnavailableWarning):
        report = wsconvert.plan_conversion(NeedsTwoInputs(), skip_unnormalized=True)
    assert "skip_unnormalized=True skipped nothing" in report.hints[0].message


def test_synthetic_probe_hint_is_not_a_warning_and_says_how_to_give_an_input() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeUnavailableWarning)
        report = wsconvert.plan_conversion(Untraceable(), gn=32)
    hint = next(h for h in report.hints if h.kind == "probe_synthetic")
    assert not hint.warning
    assert "synthetic input" in hint.message and "example_inputs=" in hint.message and "--input-shape" in hint.message
    assert report.unnormalized_detection.startswith("forward hooks on a synthetic input of shape (1, 3, 224, 224)")


@pytest.mark.parametrize("call", ["plan_conversion", "convert_model"])
def test_skip_unnormalized_without_probe_warns_with_filterable_category(call: str) -> None:
    assert issubclass(ProbeUnavailableWarning, UserWarning)
    with pytest.warns(ProbeUnavailableWarning, match="skipped nothing.*input_shape"):
        getattr(wsconvert, call)(NeedsTwoInputs(), skip_unnormalized=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=ProbeUnavailableWarning)
        getattr(wsconvert, call)(NeedsTwoInputs(), skip_unnormalized=True)  # users can filter it


class FailsOnInput(AllNormalized):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise RuntimeError("expected 3 channels")
        return super().forward(x)


def test_pooled_check_on_failing_input_warns_with_category() -> None:
    with pytest.warns(ProbeUnavailableWarning, match="GroupNorm group sizes.*input_shape"):
        wsconvert.convert_model(FailsOnInput(), gn=32, input_shape=(1, 5, 8, 8))


def test_no_warning_when_probe_runs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeUnavailableWarning)
        wsconvert.convert_model(Untraceable(), gn=32, skip_unnormalized=True, input_shape=(1, 3, 8, 8))
        wsconvert.convert_model(AllNormalized(), gn=32, input_shape=(1, 3, 8, 8))


CLI_CASES = [
    # id, architecture, extra arguments, expected Warning: lines, expected hint kinds
    ("synthetic", "Untraceable", [], 0, ["unnormalized", "probe_synthetic"]),
    ("input", "Untraceable", ["--input-shape", "1,3,8,8"], 0, ["unnormalized"]),
    ("unavailable", "NeedsTwoInputs", [], 1, ["probe_unavailable"]),
]


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize(
    ("arch", "extra", "warned", "hints"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_cli_prints_warning_line_on_stderr(
    tmp_path, as_json: bool, arch: str, extra: list[str], warned: int, hints: list[str]
) -> None:
    source = tmp_path / "in.pt"
    torch.save(Untraceable().state_dict(), source)
    args = [str(source), "-o", str(tmp_path / "out.pt"), "--arch", f"test_report_hints:{arch}", *extra]
    result = CliRunner().invoke(main, args + (["--json"] if as_json else []))
    assert result.exit_code == 0, result.output
    warning_lines = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warning_lines) == warned, result.stderr
    assert "ProbeUnavailableWarning" not in result.stderr  # not Python's warning format on top of the line
    if warned:
        line = warning_lines[0]
        assert "torch.fx cannot trace" in line and "synthetic input" in line and "--input-shape" in line
    if as_json:
        report = json.loads(result.stdout)["report"]  # stdout is pure JSON, hints included
        assert [h["kind"] for h in report["hints"]] == hints
    else:
        assert "What to do:" in result.stdout


def test_cli_skip_unnormalized_without_input_warns_once_in_its_own_format(tmp_path) -> None:
    source = tmp_path / "in.pt"
    torch.save(Untraceable().state_dict(), source)
    args = [str(source), "-o", str(tmp_path / "out.pt"), "--arch", "test_report_hints:NeedsTwoInputs"]
    result = CliRunner().invoke(main, [*args, "--gn", "4", "--skip-unnormalized"])
    assert result.exit_code == 0, result.output
    assert "ProbeUnavailableWarning" not in result.stderr  # not Python's warning format on top of the line
    warning_lines = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warning_lines) == 1 and "skip_unnormalized=True skipped nothing" in warning_lines[0]


# --- a model frozen as a whole ---------------------------------------------------------------------------------


def _frozen_cnn(frozen: str) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    if frozen == "all":
        net.requires_grad_(False)
    elif frozen == "first conv":
        net[0].weight.requires_grad_(False)
    return net


@pytest.mark.parametrize(("frozen", "warns"), [("all", True), ("first conv", False), ("none", False)])
def test_a_model_frozen_as_a_whole_is_a_warning(frozen: str, warns: bool) -> None:
    """All convs frozen: nothing is standardized, which convert_model (no report) must say as a warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = wsconvert.convert_model(_frozen_cnn(frozen), gn=4)
    said = [w for w in caught if issubclass(w.category, wsconvert.errors.FrozenModelWarning)]
    assert len(said) == (1 if warns else 0), [str(w.message) for w in caught]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wsconvert.errors.FrozenModelWarning)  # the same warning, checked above
        report = wsconvert.plan_conversion(_frozen_cnn(frozen), gn=4)
    hints = [h for h in report.hints if h.kind == "frozen_model"]
    assert len(hints) == (1 if warns else 0)
    if warns:
        message = str(said[0].message)
        assert said[0].filename == __file__  # points at the user's call
        assert "all 2 conv(s)" in message and "standardize_frozen=True" in message and "requires_grad_(True)" in message
        assert hints[0].warning and hints[0].message == message
        assert not any(wsconvert.is_standardized(m) for m in converted.modules())
        unfrozen = wsconvert.convert_model(_frozen_cnn(frozen), gn=4, standardize_frozen=True)
        assert wsconvert.is_standardized(unfrozen[0]) and wsconvert.is_standardized(unfrozen[3])


def test_cli_says_a_frozen_whole_model_once(tmp_path) -> None:
    """A pickled whole model saved frozen (for inference): one Warning: line, not a Python warning."""
    path = tmp_path / "frozen.pt"
    torch.save(_frozen_cnn("all"), path)
    result = CliRunner().invoke(main, [str(path), "--trust-pickle", "--gn", "4", "-o", str(tmp_path / "out.pt")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "no conv was standardized" in line]
    assert len(lines) == 1 and lines[0].startswith("Warning: "), result.stderr
    assert "FrozenModelWarning" not in result.stderr
