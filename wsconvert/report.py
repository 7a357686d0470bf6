"""ConversionReport: what a conversion did (or would do), as a table for people and a dict for machines."""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .errors import FrozenModelWarning, ProbeUnavailableWarning
from .rules.conv import FROZEN_REASON

if TYPE_CHECKING:  # the report only holds a Fidelity; preserve (above this layer) builds it
    from .preserve.fidelity import Fidelity

# What to do when a check needs a forward pass and has none (or the trace failed): said by warnings and hints.
INPUT_FIX = (
    "give an input the model runs on: example_inputs=(tensor,) or input_shape=(1, 3, 224, 224) "
    "(CLI --input-shape 1,3,224,224)"
)
# How ``unnormalized_detection`` starts when the hook probe ran on an input built from the model (no input given).
SYNTHETIC_DETECTION = "forward hooks on a synthetic input"

__all__ = [
    "ConvertedModule",
    "SkippedModule",
    "GroupFallback",
    "UnnormalizedConv",
    "Hint",
    "ConversionReport",
    "warn_loud_hints",
]


@dataclass(frozen=True)
class ConvertedModule:
    path: str
    old_type: str
    new_type: str
    action: str  # "standardized" (WS parametrization added in place) or "replaced" (a new module)
    also_at: tuple[str, ...] = ()


@dataclass(frozen=True)
class SkippedModule:
    path: str
    type: str
    reason: str
    also_at: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupFallback:
    """A norm layer whose requested groups do not divide its channels, and the groups used instead (the largest
    divisor below). A norm given one group because it sees one value per channel (wsconvert.probes.pooled) is not
    one: its decision's note says so."""

    path: str
    channels: int
    requested: int
    groups: int


@dataclass(frozen=True)
class UnnormalizedConv:
    """A conv whose output feeds something other than a normalization layer (see wsconvert.probes.unnormalized)."""

    path: str
    type: str
    feeds: str  # what consumes the output instead, e.g. "sigmoid", "Conv2d", "add", "model output"
    also_at: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hint:
    """What to do about something the report found; ``warning`` hints mean a result is missing (the CLI prints
    them as ``Warning:`` lines on stderr)."""

    kind: str  # "unnormalized", "instance_norm", "probe_synthetic", "probe_unavailable"
    message: str
    warning: bool = False


@dataclass
class ConversionReport:
    """Every converted module, every skipped candidate with its reason, GroupNorm fallbacks and notes.

    Paths are dotted module paths ("" is the model itself); a module shared at several paths is listed
    once, at its first path, with the others in ``also_at``.
    """

    options: dict
    converted: list[ConvertedModule] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    group_fallbacks: list[GroupFallback] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Convs whose output feeds no normalization layer, and how that was found (wsconvert.probes.unnormalized):
    # "" when not probed, else the method, or "unavailable: <why>".
    unnormalized: list[UnnormalizedConv] = field(default_factory=list)
    unnormalized_detection: str = ""
    # With preserve=True and calibration data: agreement with the original model (wsconvert.preserve.fidelity).
    fidelity: Fidelity | None = None

    def to_dict(self) -> dict:
        """A JSON-serializable dict."""
        return {
            "options": dict(self.options),
            "summary": self.summary(),
            "converted": [asdict(c) | {"also_at": list(c.also_at)} for c in self.converted],
            "skipped": [asdict(s) | {"also_at": list(s.also_at)} for s in self.skipped],
            "group_fallbacks": [asdict(g) for g in self.group_fallbacks],
            "notes": list(self.notes),
            "unnormalized": [asdict(u) | {"also_at": list(u.also_at)} for u in self.unnormalized],
            "unnormalized_detection": self.unnormalized_detection,
            "fidelity": None if self.fidelity is None else self.fidelity.to_dict(),
            "hints": [asdict(h) for h in self.hints],
        }

    @property
    def hints(self) -> list[Hint]:
        """What to do about the findings, derived from the report's contents (so str() and to_dict() agree)."""
        found = [
            _frozen_hint(self),
            _unnormalized_hint(self),
            _instance_norm_hint(self),
            _synthetic_probe_hint(self),
            _probe_hint(self),
        ]
        return [hint for hint in found if hint is not None]

    def summary(self) -> dict[str, int]:
        standardized = sum(1 for c in self.converted if c.action == "standardized")
        return {
            "standardized": standardized,
            "replaced": len(self.converted) - standardized,
            "skipped": len(self.skipped),
            "group_fallbacks": len(self.group_fallbacks),
        }

    def __str__(self) -> str:
        counts = self.summary()
        lines = [
            f"wsconvert: {counts['standardized']} conv(s) weight-standardized, {counts['replaced']} norm layer(s) "
            f"replaced, {counts['skipped']} skipped, {counts['group_fallbacks']} GroupNorm group fallback(s)"
        ]
        if self.converted:
            lines += ["", "Converted:"]
            lines += _table(
                ("path", "from", "to"),
                [(_where(c.path, c.also_at), c.old_type, c.new_type) for c in self.converted],
            )
        if self.skipped:
            lines += ["", "Skipped:"]
            lines += _table(
                ("path", "type", "reason"), [(_where(s.path, s.also_at), s.type, s.reason) for s in self.skipped]
            )
        if self.group_fallbacks:
            lines += ["", "GroupNorm groups (requested groups do not divide the channels):"]
            lines += _table(
                ("path", "channels", "requested", "used"),
                [(g.path or "<model>", str(g.channels), str(g.requested), str(g.groups)) for g in self.group_fallbacks],
            )
        if self.unnormalized:
            lines += ["", f"Output feeds no normalization layer (found by {self.unnormalized_detection}):"]
            lines += _table(
                ("path", "type", "feeds"), [(_where(u.path, u.also_at), u.type, u.feeds) for u in self.unnormalized]
            )
        elif self.unnormalized_detection.startswith("unavailable"):
            lines += ["", f"Unnormalized-conv detection {self.unnormalized_detection}"]
        elif self.unnormalized_detection.startswith(SYNTHETIC_DETECTION):
            lines += ["", f"No conv feeds anything but a normalization layer (found by {self.unnormalized_detection})"]
        if self.fidelity is not None:
            lines += ["", *self.fidelity.lines()]
        if self.notes:
            lines += ["", "Notes:"] + [f"- {note}" for note in self.notes]
        if self.hints:
            lines += ["", "What to do:"] + [f"- {'Warning: ' if h.warning else ''}{h.message}" for h in self.hints]
        return "\n".join(lines)


# Hints that are also Python warnings (convert_model returns no report): their kind and warning class.
_WARNED_HINTS = {"probe_unavailable": ProbeUnavailableWarning, "frozen_model": FrozenModelWarning}


def _outside_package_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside wsconvert (the user's call)."""
    package = __name__.partition(".")[0]
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == package:
        frame, level = frame.f_back, level + 1
    return level


def warn_loud_hints(report: ConversionReport) -> None:
    """Warn with each hint a Python caller must not miss: the unnormalized-conv probe ran and could not classify
    the convs (``ProbeUnavailableWarning``: why, and how to give it an input), or nothing was standardized because
    every conv is frozen (``FrozenModelWarning``). The CLI prints the same texts as ``Warning:`` lines."""
    for hint in report.hints:
        category = _WARNED_HINTS.get(hint.kind)
        if category is not None:
            warnings.warn(hint.message, category, stacklevel=_outside_package_stacklevel())


def _frozen_hint(report: ConversionReport) -> Hint | None:
    """Every conv WS would take was left because its weight is frozen: a model frozen as a whole (saved for
    inference, or ``requires_grad_(False)`` before converting) comes out unchanged, which is a warning."""
    frozen = [s for s in report.skipped if s.reason == FROZEN_REASON]
    if not frozen or any(c.action == "standardized" for c in report.converted):
        return None
    return Hint(
        "frozen_model",
        f"no conv was standardized: the weights of all {len(frozen)} conv(s) it would take are frozen "
        f"(requires_grad=False, e.g. {_where(frozen[0].path, frozen[0].also_at)}); unfreeze the model "
        "(model.requires_grad_(True)) before converting, or pass standardize_frozen=True (CLI --standardize-frozen)",
        warning=True,
    )


def _unnormalized_hint(report: ConversionReport) -> Hint | None:
    """Unnormalized convs that were (or would be) standardized: how to leave them alone, and what that changes."""
    if not report.unnormalized or report.options.get("skip_unnormalized"):
        return None
    standardized = {c.path for c in report.converted if c.action == "standardized"}
    affected = [u for u in report.unnormalized if u.path in standardized]
    if not affected:
        return None
    return Hint(
        "unnormalized",
        f"{len(affected)} of {len(standardized)} standardized conv(s) feed no normalization layer, so weight "
        "standardization fixes their output scale; to leave them unstandardized pass skip_unnormalized=True (CLI "
        f"--skip-unnormalized): {len(standardized) - len(affected)} conv(s) are then standardized. Its effect on "
        "accuracy has not been measured by wsconvert; MosaicML Composer had to exclude the last 15 convs of "
        "DeepLabv3+ for this reason (Composer PR #1562; docs/unnormalized.md)",
    )


def _instance_norm_hint(report: ConversionReport) -> Hint | None:
    """GroupNorm fallbacks with one channel per group: that is InstanceNorm, not GroupNorm."""
    single = [g for g in report.group_fallbacks if g.groups == g.channels and g.channels > 1]
    if not single:
        return None
    shown = ", ".join(g.path or "<model>" for g in single[:3]) + (", ..." if len(single) > 3 else "")
    common = math.gcd(*(g.channels for g in single))
    smaller = common // min(p for p in range(2, common + 1) if common % p == 0) if common > 1 else 0
    suggestion = (
        f"a smaller gn, e.g. gn={smaller} ({common // smaller} channels per group there)"
        if smaller
        else "a smaller gn that divides their channels"
    )
    return Hint(
        "instance_norm",
        f"{len(single)} GroupNorm fallback(s) leave one channel per group ({shown}): that is InstanceNorm "
        f"(Wu & He, arXiv:1803.08494), which normalizes each channel on its own; for GroupNorm pass {suggestion}",
    )


def _synthetic_probe_hint(report: ConversionReport) -> Hint | None:
    """The probe ran on an input wsconvert built (torch.fx could not trace and no input was given)."""
    if not report.unnormalized_detection.startswith(SYNTHETIC_DETECTION):
        return None
    return Hint(
        "probe_synthetic",
        "torch.fx cannot trace the model and no input was given, so the unnormalized-conv probe ran it once on a "
        "synthetic input built from the model (shape and sources above): what it found holds for the branches that "
        f"input takes; {INPUT_FIX}",
    )


def _probe_hint(report: ConversionReport) -> Hint | None:
    """The unnormalized-conv probe could not run: why, and how to give it what it needs."""
    if not report.unnormalized_detection.startswith("unavailable"):
        return None
    why = report.unnormalized_detection.removeprefix("unavailable").lstrip(": ")
    skipped = " and skip_unnormalized=True skipped nothing" if report.options.get("skip_unnormalized") else ""
    fix = "" if "input_shape" in why else f"; {INPUT_FIX}"
    return Hint(
        "probe_unavailable",
        f"convs whose output feeds no normalization layer could not be looked for{skipped}: {why}{fix}",
        warning=True,
    )


def _where(path: str, also_at: tuple[str, ...]) -> str:
    shown = path or "<model>"
    return f"{shown} (+{len(also_at)} shared)" if also_at else shown


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    out = ["  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)).rstrip()]
    out += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in rows]
    return out
