"""Click options generated from the declared options (``wsconvert.options``), as sqlite-utils generates its
reusable option decorators from one declaration (github.com/simonw/sqlite-utils/blob/main/sqlite_utils/cli.py).

A value that the CLI checks while parsing goes through the option's own validator (``Option.validate``), so a
bad value gives the library's message, as a usage error (exit 2); there is no second copy of the checks here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from .errors import InvalidOptionError
from .options import Option, keyword_arguments

__all__ = ["declared_option", "declared_options"]

F = TypeVar("F", bound=Callable[..., Any])
_BY_NAME = {option.name: option for option in keyword_arguments()}


class _Checked:
    """Mixin for a click type: parse the text with ``parse``, then check it with the option's validator."""

    def __init__(self, option: Option, parse: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.option, self.parse = option, parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        parsed = self.parse(value, param, ctx)
        if ctx is not None and ctx.resilient_parsing:  # shell completion: no check on a half-typed value
            return parsed
        try:
            return self.option.validate(parsed)
        except InvalidOptionError as error:
            self.fail(str(error), param, ctx)  # type: ignore[attr-defined]


class _CheckedChoice(_Checked, click.Choice):
    """A Choice (its metavar and shell completion) whose values are checked by the validator alone."""


class _CheckedIntRange(_Checked, click.IntRange):
    """An IntRange (its ``[x>=1]`` in --help) whose values are checked by the validator alone."""


class _CheckedFloat(_Checked, click.types.FloatParamType):
    """A float checked by the validator."""


def _same(value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
    return value


def _click_type(option: Option) -> click.ParamType | None:
    checked = option.usage_error and option.validate is not None
    if option.kind == "choice":
        return _CheckedChoice(option, _same, list(option.choices)) if checked else click.Choice(list(option.choices))
    if option.kind == "int":
        if not checked:
            return click.INT
        return _CheckedIntRange(option, click.INT.convert, min=option.minimum)
    if option.kind == "float":
        return _CheckedFloat(option, click.FLOAT.convert) if checked else click.FLOAT
    return None


def declared_option(name: str, **overrides: Any) -> Callable[[F], F]:
    """The click option of the declared option ``name`` (flag, help, type, default); ``overrides`` are passed
    to ``click.option`` (a ``callback`` parsing a run argument's text, say)."""
    option = _BY_NAME[name]
    if option.flag is None:
        raise ValueError(f"{name!r} is a library-only option: it declares no CLI flag")
    settings: dict[str, Any] = {"help": option.help}
    if option.kind == "flag":
        settings["is_flag"] = True
    else:
        settings["type"] = _click_type(option)
        if option.default is not None:
            settings["default"] = option.default
    for key in ("metavar", "multiple", "show_default"):
        if getattr(option, key):
            settings[key] = getattr(option, key)
    settings.update(overrides)
    return click.option(option.flag, name, **settings)


def declared_options(*names: str) -> Callable[[F], F]:
    """The click options of the declared options ``names``, listed in ``--help`` in this order."""
    decorators = [declared_option(name) for name in names]

    def decorate(command: F) -> F:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate
