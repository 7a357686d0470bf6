"""The ``wsconvert`` command: a thin click layer over ``wsconvert.checkpoint.rewrite.convert_checkpoint``.

Expected failures (a WSConvertError) become one ``Error: ...`` line on stderr and exit code 1; click
reports usage errors with exit code 2. Ctrl-C is click's ``Aborted!`` (exit 1) wherever it lands, also
inside a library that re-raises it as its own error (torch's zip writer: a RuntimeError), and while torch is
being imported: this module imports neither torch nor the converter at import time (``wsconvert/__init__.py``
is lazy), the command imports them inside click, whose handler turns KeyboardInterrupt into ``Aborted!``.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click

from . import __version__
from .cli_options import declared_option, declared_options
from .errors import FrozenModelWarning, ProbeUnavailableWarning, WSConvertError, caused_by
from .options import keyword_arguments

__all__ = ["main", "library_options"]

EPILOG = """\b
Examples:
  wsconvert resnet18.pt --arch torchvision:resnet18 --gn 32
  wsconvert last.pth.tar --gn 32                 # timm train.py checkpoint, names its arch
  wsconvert model.safetensors --arch timm:resnet50 --arch-kwargs '{"num_classes": 10}'
  wsconvert model.pt --arch torchvision:resnet18 --dry-run --json
  wsconvert whole_model.pt --trust-pickle --gn 32   # torch.save(model) pickle
  wsconvert tiny-resnet/ --gn 32                 # save_pretrained directory -> tiny-resnet.ws/

\b
Exit codes:
  0  success
  1  conversion or load error (one line on stderr, no output file)
  2  usage error
"""


def library_options(params: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments for convert_model / plan_conversion from the command's parameters.

    Derived from the declaration (``wsconvert.options``): the options recorded even at their default first,
    then the newer ones, recorded only when given, so that earlier outputs' option records stay as they were.
    """
    declared = [option for option in keyword_arguments() if option.flag is not None and option.name in params]
    options: dict[str, Any] = {}
    for option in sorted(declared, key=lambda option: not option.recorded_at_default):
        value = params[option.name]
        if option.multiple:
            value = list(value) or None
        at_default = type(value) is type(option.default) and value == option.default  # 0.0 is given, not None
        if option.recorded_at_default or not at_default:
            options[option.name] = value
    return options


def _json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"not valid JSON ({error.msg} at column {error.colno}): {value}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"must be a JSON object such as '{{\"num_classes\": 10}}', got {value}")
    return parsed


def _input_shape(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        shape = [int(part) for part in value.split(",")]
    except ValueError:
        shape = []
    if not shape or any(d < 1 for d in shape):
        raise click.BadParameter(f"{value!r} must be comma-separated positive integers, e.g. 1,3,224,224")
    return shape


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class _Progress:
    """Phase messages and a byte counter on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.monotonic()
        self._last = 0.0
        self._percent: int | None = None

    def phase(self, message: str) -> None:
        if self.enabled:
            click.echo(f"\r\x1b[K{message} ...", err=True, nl=False)

    def bytes(self, done: int, total: int) -> None:
        """With a known total each whole percentage is drawn once (100 % once); without one, at most 5 times/s."""
        if not self.enabled:
            return
        if total:
            percent = min(100, 100 * done // total)
            if percent == self._percent:
                return
            self._percent = percent
            shown = f" ({percent}%)"
        else:
            now = time.monotonic()
            if now - self._last <= 0.2:
                return
            self._last, shown = now, ""
        click.echo(f"\r\x1b[Kwriting {done / 2**20:,.0f} MiB{shown}", err=True, nl=False)

    def done(self) -> None:
        if self.enabled:
            click.echo(f"\r\x1b[Kdone in {time.monotonic() - self.start:.1f}s", err=True)

    def clear(self) -> None:
        """Erase the progress line, so that an error or ``Aborted!`` is the only text on it."""
        if self.enabled:
            click.echo("\r\x1b[K", err=True, nl=False)


@click.command(
    # A fixed width keeps --help identical everywhere (the README embeds it, tests/test_cli_readme.py checks).
    context_settings={"help_option_names": ["-h", "--help"], "terminal_width": 100, "max_content_width": 100},
    epilog=EPILOG,
)
@click.argument("input", type=click.Path(path_type=Path, dir_okay=True))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output file [default: INPUT's <stem>.ws<suffix>], or directory for a directory INPUT [<name>.ws].",
)
@declared_options("gn", "norm", "bcn_estimate")
@click.option(
    "--arch",
    metavar="SPEC",
    help="Model of a state dict: torchvision:NAME, timm:NAME, effdet:NAME, transformers:ClassName or "
    "package.module:callable (optional when the checkpoint or config.json names it).",
)
@click.option(
    "--arch-kwargs",
    metavar="JSON",
    callback=_json_object,
    help="Keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.",
)
@declared_options("eps", "style", "include", "exclude", "skip_depthwise", "skip_unnormalized", "standardize_frozen")
@declared_option("input_shape", callback=_input_shape)
@declared_options("preserve")
@click.option(
    "--calibration",
    metavar="FILE",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Inputs (torch.save / safetensors / .npy tensor) to fit the GroupNorm affines on (with --preserve).",
)
@declared_options("calibration_steps")
@click.option("--bake", is_flag=True, help="Store standardized weights as plain conv weights (inference/export).")
@click.option("--dry-run", is_flag=True, help="Load, plan and report; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print only the report, as JSON, on stdout.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file (or a directory wsconvert wrote).")
@click.option(
    "--trust-pickle", is_flag=True, help="Allow a whole pickled model (loading a pickle runs code from the file)."
)
@click.version_option(__version__, prog_name="wsconvert")
def main(**params: Any) -> None:  # noqa: D417 - click renders the options
    """Convert a saved PyTorch checkpoint to Weight Standardization (optionally BatchNorm -> GroupNorm).

    INPUT is a state dict, a training checkpoint (timm, torchvision references, Lightning), a safetensors
    file, a transformers save_pretrained directory (config.json names the model; the output directory loads with
    wsconvert.checkpoint.directory.load_pretrained) or, with --trust-pickle, a whole pickled model. The output
    keeps INPUT's layout; optimizer and
    scheduler state is dropped (it no longer lines up with the converted parameters). The rewritten state
    dict loads with strict=True into convert_model(arch(), same options). INPUT is never modified.
    """
    progress = _Progress(_stderr_is_terminal() and not params["as_json"])
    # Imported here, inside click's handler: Ctrl-C during the torch import (most of a cold start) is Aborted!.
    from .checkpoint.rewrite import convert_checkpoint

    try:
        with warnings.catch_warnings(record=True) as caught:  # said as Warning: lines below, not in Python's format
            warnings.simplefilter("always", ProbeUnavailableWarning)
            warnings.simplefilter("always", FrozenModelWarning)
            result = convert_checkpoint(
                params["input"],
                params["output"],
                options=library_options(params),
                arch=params["arch"],
                arch_kwargs=params["arch_kwargs"],
                bake=params["bake"],
                dry_run=params["dry_run"],
                force=params["force"],
                trust_pickle=params["trust_pickle"],
                calibration=params["calibration"],
                progress=progress.phase,
                on_bytes=progress.bytes if progress.enabled else None,
            )
    except KeyboardInterrupt:
        progress.clear()
        raise
    except Exception as error:
        progress.clear()
        if caused_by(error, KeyboardInterrupt):  # Ctrl-C that a library re-raised as its own error
            raise KeyboardInterrupt from None
        if not isinstance(error, WSConvertError):
            raise  # a bug: keep the traceback
        raise click.ClickException(" ".join(str(error).split())) from None
    progress.done()
    if params["as_json"]:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(str(result))
    said = set()  # each text once: a checkpoint with several state dicts plans (and warns) once per state dict
    for hint in result.report.hints:  # a missing result, loudly (stderr keeps --json output pure JSON)
        if hint.warning and hint.message not in said:
            said.add(hint.message)
            click.echo(f"Warning: {hint.message}", err=True)
    for warning in caught:
        if not issubclass(warning.category, (ProbeUnavailableWarning, FrozenModelWarning)):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        elif str(warning.message) not in said:  # each of these warnings is a hint's text: said above
            said.add(str(warning.message))
            click.echo(f"Warning: {warning.message}", err=True)
