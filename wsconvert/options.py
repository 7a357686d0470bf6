"""ConversionOptions: the options of convert_model, plan_conversion and the CLI, each declared once.

Every ``ConversionOptions`` field carries an ``Option`` (its keyword default, one-line help, CLI flag and
validator) in its ``dataclasses.field`` metadata; ``ConversionOptions.build`` runs those validators, the CLI
generates its click options from them (``wsconvert.cli_options``, after sqlite-utils' reusable click option
decorators, github.com/simonw/sqlite-utils/blob/main/sqlite_utils/cli.py), and tests/test_options_declared.py
checks the keyword API, the CLI and the option tables in README.md / docs/api.md against them. The run
arguments that are not conversion options (``inplace``, ``example_inputs``, ...) are declared in
``RUN_ARGUMENTS``. Adding an option: one field here and one keyword in convert_model / plan_conversion.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ._validate import STYLE_NAMES, validate_eps, validate_estimate, validate_style
from .errors import InvalidOptionError

__all__ = ["ConversionOptions", "NORMS", "STYLE_NAMES", "OPTIONS", "Option", "RUN_ARGUMENTS", "keyword_arguments"]

NORMS = ("gn", "bcn")
_OPTION = "wsconvert.option"  # the dataclasses.field metadata key holding a field's Option


@dataclass(frozen=True)
class Option:
    """One keyword argument of convert_model / plan_conversion, declared once.

    ``default`` is the keyword's default, ``doc`` its one-line meaning in the README option table, ``help``
    its ``--help`` line and ``flag`` its CLI flag (None: library only). ``kind`` ("int", "float", "choice",
    "flag" or "text"), ``metavar``, ``choices``, ``multiple``, ``show_default`` and ``minimum`` (the range
    ``--help`` shows) describe the click option. ``validate`` returns the checked value or raises
    InvalidOptionError; ``usage_error`` says whether the CLI runs it while parsing (a usage error, exit 2)
    or leaves it to ``build`` with the other options (exit 1). ``recorded_at_default``: the CLI records the
    option in its output even at its default (the original options); newer ones only when given, so that
    earlier outputs' option records stay as they were.
    """

    name: str
    default: Any
    doc: str
    help: str | None = None
    flag: str | None = None
    kind: str = "text"
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    multiple: bool = False
    show_default: bool = False
    minimum: int | None = None
    validate: Callable[[Any], Any] | None = None
    usage_error: bool = True
    recorded_at_default: bool = False


def _groups(gn: object) -> int | None:
    if gn is not None and (isinstance(gn, bool) or not isinstance(gn, int) or gn < 1):
        raise InvalidOptionError(
            f"gn={gn!r} must be an integer >= 1 (the number of GroupNorm groups, e.g. 32), "
            "or None to keep the norm layers"
        )
    return gn


def _boolean(name: str) -> Callable[[object], bool]:
    def validate(value: object) -> bool:
        if not isinstance(value, bool):
            raise InvalidOptionError(f"{name}={value!r} must be True or False")
        return value

    return validate


def _patterns(name: str) -> Callable[[object], tuple[str, ...]]:
    def validate(value: str | Iterable[str] | None) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        try:
            patterns = tuple(value)
        except TypeError:
            raise InvalidOptionError(
                f"{name}={value!r} must be a list of glob patterns on dotted module paths, e.g. ['layer4.*']"
            ) from None
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern:
                raise InvalidOptionError(
                    f"{name} contains {pattern!r}; each entry must be a non-empty glob string such as 'layer4.*'"
                )
        return patterns

    return validate


def _norm(norm: object) -> str:
    """What replaces BatchNorm: "gn" GroupNorm (also for None), "bcn" BatchChannelNorm (arXiv:1903.10520)."""
    if norm is not None and norm not in NORMS:
        raise InvalidOptionError(
            f"norm={norm!r} must be 'gn' (GroupNorm) or 'bcn' (Batch-Channel Normalization, arXiv:1903.10520)"
        )
    return norm or "gn"


def _steps(steps: object) -> int | None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise InvalidOptionError(
            f"calibration_steps={steps!r} must be an integer >= 0 (0: the layer-wise least-squares fit only), "
            "or None for the default of 100"
        )
    return steps


def _check_combination(given: dict[str, Any], gn: int | None, norm: str) -> None:
    """The checks that need two options: ``norm`` needs ``gn``, ``bcn_estimate`` needs ``norm="bcn"``,
    ``calibration_steps`` needs ``preserve``."""
    if given["calibration_steps"] is not None and not given["preserve"]:
        raise InvalidOptionError(
            f"calibration_steps={given['calibration_steps']!r} sets how the GroupNorm affines are fitted on "
            "calibration data, which only preserve=True does: pass preserve=True and calibration_data with it"
        )
    if given["norm"] is not None and gn is None:
        raise InvalidOptionError(
            f"norm={given['norm']!r} replaces BatchNorm layers and needs the number of groups: "
            "pass gn=G as well (e.g. gn=32)"
        )
    if given["bcn_estimate"] is not None and norm != "bcn":
        raise InvalidOptionError(
            f"bcn_estimate={given['bcn_estimate']!r} selects estimated BatchNorm inside Batch-Channel "
            "Normalization; pass norm='bcn' (and gn=G) with it"
        )


def _declare(default: Any, doc: str, *, stored: Any = None, **spec: Any) -> Any:
    """A ConversionOptions field declaring its Option. The field's own default is ``stored`` where the
    validator turns the keyword default into another value (None into () or "gn"), else the keyword default
    (a test checks that ``ConversionOptions() == ConversionOptions.build()``)."""
    return field(default=default if stored is None else stored, metadata={_OPTION: Option("", default, doc, **spec)})


@dataclass(frozen=True)
class ConversionOptions:
    """What to convert and how. Build it with ``ConversionOptions.build(...)``, which validates."""

    gn: int | None = _declare(
        None,
        "replace BatchNorm layers by GroupNorm with this many groups (`None` keeps norm layers)",
        help="Replace BatchNorm with GroupNorm of G groups (largest divisor of C <= G).",
        flag="--gn",
        kind="int",
        minimum=1,
        validate=_groups,
        recorded_at_default=True,
    )
    eps: float = _declare(
        1e-5,
        "WS epsilon",
        help="Epsilon of the standardization.",
        flag="--eps",
        kind="float",
        show_default=True,
        validate=validate_eps,
        recorded_at_default=True,
    )
    style: str = _declare(
        "standard",
        '`"standard"`: `(W-mean)/sqrt(var+eps)`, biased variance, as timm\'s StdConv2d; `"paper"`: '
        "`(W-mean)/(std+eps)`, unbiased std, as the authors' code",
        help="standard: (W-mean)/sqrt(var+eps); paper: (W-mean)/(std+eps).",
        flag="--style",
        kind="choice",
        choices=STYLE_NAMES,
        show_default=True,
        validate=validate_style,
        recorded_at_default=True,
    )
    include: tuple[str, ...] = _declare(
        None,
        'fnmatch globs on dotted module paths, e.g. `include=["layer4.*"]`: only matching modules are converted',
        help="Only convert modules whose dotted path matches (repeatable).",
        flag="--include",
        stored=(),
        metavar="GLOB",
        multiple=True,
        validate=_patterns("include"),
        usage_error=False,
        recorded_at_default=True,
    )
    exclude: tuple[str, ...] = _declare(
        None,
        'fnmatch globs on dotted module paths, e.g. `exclude=["fc", "layer4.*"]`: matching modules are left',
        help="Leave modules whose dotted path matches (repeatable).",
        flag="--exclude",
        stored=(),
        metavar="GLOB",
        multiple=True,
        validate=_patterns("exclude"),
        usage_error=False,
        recorded_at_default=True,
    )
    skip_depthwise: bool = _declare(
        False,
        "leave depthwise convs unstandardized",
        help="Do not standardize depthwise convs.",
        flag="--skip-depthwise",
        kind="flag",
        validate=_boolean("skip_depthwise"),
        recorded_at_default=True,
    )
    skip_unnormalized: bool = _declare(
        False,
        "leave convs whose output feeds no norm layer (SE blocks, heads) unstandardized",
        help="Do not standardize convs whose output feeds no norm layer (SE convs, heads; docs/unnormalized.md).",
        flag="--skip-unnormalized",
        kind="flag",
        validate=_boolean("skip_unnormalized"),
        recorded_at_default=True,
    )
    norm: str = _declare(
        None,
        'what replaces BatchNorm when `gn` is set: `"gn"` GroupNorm (also for `None`), `"bcn"` Batch-Channel '
        "Normalization",
        stored="gn",
        help="With --gn, what replaces BatchNorm: gn GroupNorm [default], bcn Batch-Channel Normalization.",
        flag="--norm",
        kind="choice",
        choices=NORMS,
        validate=_norm,
    )
    bcn_estimate: float | None = _declare(
        None,
        'with `norm="bcn"`: rate `0 < r <= 1` of the estimated BatchNorm (EstBN)',
        help="With --norm bcn: estimated BatchNorm part, statistics updated at rate R (0 < R <= 1).",
        flag="--bcn-estimate",
        kind="float",
        metavar="R",
        validate=validate_estimate,
        usage_error=False,  # checked with --norm by build: exit 1, as before (tests/test_bcn.py)
    )
    preserve: bool = _declare(
        False,
        "keep what a trained model computes: Adaptive WS gain/shift per filter (exact), GroupNorm affines from "
        "the replaced BatchNorm ([docs/preserve.md](docs/preserve.md))",
        help="Keep what the trained model computes: Adaptive WS gain/shift, GroupNorm affines from BatchNorm.",
        flag="--preserve",
        kind="flag",
        validate=_boolean("preserve"),
    )
    standardize_frozen: bool = _declare(
        False,
        "also standardize conv weights with `requires_grad=False` (by default they are left, with the reason: a "
        "frozen weight cannot adapt to WS, e.g. ultralytics' fixed DFL conv)",
        help="Also standardize frozen conv weights (requires_grad=False), e.g. ultralytics' fixed DFL conv.",
        flag="--standardize-frozen",
        kind="flag",
        validate=_boolean("standardize_frozen"),
    )
    calibration_steps: int | None = _declare(
        None,
        "with `preserve` and `calibration_data`: Adam steps of the end-to-end distillation of the GroupNorm "
        "affines after the layer-wise fit (`None`: 100; `0`: the least-squares fit only; "
        "[docs/preserve.md](docs/preserve.md))",
        help="With --calibration: distillation steps of the GroupNorm affines (default 100; 0: least squares only).",
        flag="--calibration-steps",
        kind="int",
        metavar="N",
        minimum=0,
        validate=_steps,
    )

    @classmethod
    def build(cls, **options: Any) -> ConversionOptions:
        """Validated options from convert_model's keyword arguments (each field's ``Option.validate``)."""
        unknown = [name for name in options if name not in _BY_NAME]
        if unknown:
            raise InvalidOptionError(
                f"unknown conversion option {unknown[0]!r}; the options are: {', '.join(_BY_NAME)}"
            )
        given = {option.name: options.get(option.name, option.default) for option in OPTIONS}
        values = {name: _BY_NAME[name].validate(value) for name, value in given.items()}
        _check_combination(given, values["gn"], values["norm"])
        return cls(**values)

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> ConversionOptions:
        """``build`` from an entry point's ``locals()``: its declared options, other arguments ignored, so
        convert_model, plan_conversion and make_plan name each option once, in their signatures."""
        return cls.build(**{option.name: arguments[option.name] for option in OPTIONS if option.name in arguments})

    def deselected_reason(self, paths: Sequence[str]) -> str | None:
        """Why the module at ``paths`` is left out by include/exclude, or None when it is selected.

        A module reachable at several paths is one object: converting it changes every path, so it is
        selected only when every one of its paths is.
        """
        for path in paths:
            for pattern in self.exclude:
                if fnmatch.fnmatchcase(path, pattern):
                    return f"excluded by pattern {pattern!r}" + (f" (at {path})" if len(paths) > 1 else "")
            if self.include and not any(fnmatch.fnmatchcase(path, p) for p in self.include):
                return "matches no include pattern" + (f" (at {path})" if len(paths) > 1 else "")
        return None

    def to_dict(self) -> dict:
        """The options as JSON values, in declaration order (checkpoints and reports record this)."""
        result = {}
        for option in OPTIONS:
            value = getattr(self, option.name)
            result[option.name] = list(value) if isinstance(value, tuple) else value
        return result


OPTIONS: tuple[Option, ...] = tuple(replace(f.metadata[_OPTION], name=f.name) for f in fields(ConversionOptions))
"""The conversion options, in declaration order."""

_BY_NAME = {option.name: option for option in OPTIONS}

RUN_ARGUMENTS: tuple[Option, ...] = (
    Option("inplace", False, "convert the model itself instead of a deep copy"),
    Option(
        "example_inputs", None, "a sample input for the unnormalized-conv probe when torch.fx cannot trace the model"
    ),
    Option(
        "input_shape",
        None,
        "shorthand for a random `example_inputs` of this shape, e.g. `(1, 3, 224, 224)` (the CLI's `--input-shape`)",
        help="Random input of this shape for the unnormalized-conv probe when torch.fx cannot trace the model.",
        flag="--input-shape",
        metavar="N,C,H,W",
        recorded_at_default=True,
    ),
    Option(
        "calibration_data",
        None,
        "with `preserve`: inputs (a Tensor or batches) to fit the GroupNorm affines on; `plan_conversion` then "
        "reports `report.fidelity` (the CLI's `--calibration FILE`)",
    ),
    Option(
        "rules",
        None,
        "`wsconvert.rules.Rule` entries consulted before the built-in table (`None`: the built-in rules only)",
    ),
)
"""The keyword arguments of convert_model / plan_conversion that are not conversion options (not recorded in
``ConversionOptions``): how and on what the conversion runs."""


def keyword_arguments() -> tuple[Option, ...]:
    """Every keyword argument of convert_model / plan_conversion: the conversion options, then the run arguments."""
    return OPTIONS + RUN_ARGUMENTS


ConversionOptions.build.__func__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_ONLY)]
    + [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default) for o in OPTIONS]
)
