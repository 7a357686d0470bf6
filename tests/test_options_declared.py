"""The options are declared once (wsconvert.options; issue point 3): the keyword API, the click options, the
README / docs/api.md option tables and the validation all follow that declaration.

Regenerate README's option table after changing a declaration: ``.venv/bin/python tests/test_options_declared.py``.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import wsconvert
from wsconvert.cli import library_options, main
from wsconvert.errors import InvalidOptionError
from wsconvert.options import OPTIONS, RUN_ARGUMENTS, STYLE_NAMES, ConversionOptions, keyword_arguments
from wsconvert.ws.standardize import STYLES

ROOT = Path(__file__).resolve().parent.parent
README, API = ROOT / "README.md", ROOT / "docs" / "api.md"
HEADING = "Options of `convert_model` / `plan_conversion`:\n\n"  # the table follows, up to a blank line
DECLARED = {option.name: option.default for option in keyword_arguments()}
ENTRY_POINTS = {  # the keyword arguments each public entry point takes
    "convert_model": set(DECLARED),
    "plan_conversion": set(DECLARED),
    "make_plan": set(DECLARED) - {"inplace"},  # a plan changes nothing; Plan.apply says where it goes
}


def _shown(value: object) -> str:
    """A default as the tables write it: ``None``, ``False``, ``"standard"``, ``1e-5``."""
    if isinstance(value, str):
        return f'"{value}"'
    return re.sub(r"e-0*(\d)", r"e-\1", repr(value))


def options_table() -> str:
    rows = [f"| `{option.name}` | `{_shown(option.default)}` | {option.doc} |" for option in keyword_arguments()]
    return "\n".join(["| option | default | meaning |", "|---|---|---|", *rows])


def _readme_table() -> str:
    match = re.search(re.escape(HEADING) + "(.*?)\n\n", README.read_text(), flags=re.S)
    assert match, f"README.md lacks its option table after {HEADING!r}"
    return match.group(1)


# --- (1) the keyword API ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_points_take_exactly_the_declared_keywords_with_their_defaults(name: str) -> None:
    function = getattr(wsconvert, name)
    parameters = inspect.signature(function).parameters.values()
    keywords = {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY] == ["model"]
    assert keywords == {key: DECLARED[key] for key in ENTRY_POINTS[name]}


def test_build_takes_the_conversion_options_and_the_dataclass_defaults_are_build_s() -> None:
    parameters = inspect.signature(ConversionOptions.build).parameters.values()
    assert {p.name: p.default for p in parameters} == {option.name: option.default for option in OPTIONS}
    assert ConversionOptions() == ConversionOptions.build()
    assert [option.name for option in OPTIONS] == list(ConversionOptions.build().to_dict())
    assert not {option.name for option in OPTIONS} & {option.name for option in RUN_ARGUMENTS}


def test_to_dict_is_what_checkpoints_recorded() -> None:
    options = ConversionOptions.build(gn=8, include="layer4.*", exclude=["fc"], norm="bcn", bcn_estimate=0.5)
    assert options.to_dict() == {
        "gn": 8, "eps": 1e-5, "style": "standard", "include": ["layer4.*"], "exclude": ["fc"],
        "skip_depthwise": False, "skip_unnormalized": False, "norm": "bcn", "bcn_estimate": 0.5, "preserve": False,
        "standardize_frozen": False, "calibration_steps": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    "keywords", [{"gnn": 32}, {"gn": 32, "inplace": True}, {"rules": []}], ids=["typo", "run argument", "rules"]
)
def test_build_rejects_unknown_keywords_naming_them_and_the_valid_ones(keywords: dict) -> None:
    unknown = next(name for name in keywords if name not in {option.name for option in OPTIONS})
    with pytest.raises(InvalidOptionError, match=rf"unknown conversion option '{unknown}'") as caught:
        ConversionOptions.build(**keywords)
    assert all(option.name in str(caught.value) for option in OPTIONS)


# --- (2) the command line ----------------------------------------------------------------------------------------


def test_every_declared_flag_is_a_click_option_with_the_declared_help() -> None:
    params = {param.name: param for param in main.params if isinstance(param, click.Option)}
    flagged = [option for option in keyword_arguments() if option.flag is not None]
    for option in flagged:
        assert option.name in params, f"{option.flag} is declared but wsconvert has no such option"
        assert params[option.name].opts == [option.flag]
        assert params[option.name].help == option.help
        assert params[option.name].is_flag is (option.kind == "flag")
    unflagged = {option.name for option in keyword_arguments() if option.flag is None}
    assert not unflagged & set(params), "a library-only option is on the command line: declare its flag"


def test_style_choices_are_the_styles() -> None:
    assert STYLE_NAMES == tuple(STYLES)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {"gn": None, "eps": 1e-5, "style": "standard", "include": None, "exclude": None,
              "skip_depthwise": False, "skip_unnormalized": False, "input_shape": None}),
        (["--gn", "8", "--norm", "bcn", "--bcn-estimate", "0", "--preserve", "--include", "a", "--include", "b",
          "--standardize-frozen", "--calibration-steps", "5"],
         {"gn": 8, "eps": 1e-5, "style": "standard", "include": ["a", "b"], "exclude": None, "skip_depthwise": False,
          "skip_unnormalized": False, "input_shape": None, "norm": "bcn", "bcn_estimate": 0.0, "preserve": True,
          "standardize_frozen": True, "calibration_steps": 5}),
    ],
    ids=["defaults", "all given"],
)  # fmt: skip
def test_library_options_keep_their_recording_rules(args: list[str], expected: dict) -> None:
    with main.make_context("wsconvert", ["in.pt", *args]) as ctx:
        recorded = library_options(ctx.params)
    assert recorded == expected and list(recorded) == list(expected)  # the key order of earlier records too


# --- (3) the option tables ---------------------------------------------------------------------------------------


def test_readme_option_table_is_the_declaration() -> None:
    assert _readme_table() == options_table(), "README's option table is stale: run tests/test_options_declared.py"


def test_api_md_lists_the_declared_arguments_with_their_defaults() -> None:
    text = API.read_text()
    section = text[text.index("## convert_model") : text.index("## plan_conversion")]
    signature = re.search(r"```python\n(convert_model\(.*?\) -> nn.Module)\n```", section, flags=re.S)
    assert signature, "docs/api.md: the convert_model signature block is missing"
    arguments = ast.parse(f"def {signature.group(1)}: ...").body[0].args
    assert [argument.arg for argument in arguments.args] == ["model"]
    shown = {a.arg: ast.literal_eval(d) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)}
    assert shown == DECLARED
    rows = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert rows == ["model", *DECLARED], "docs/api.md's argument table must list the declared arguments, in order"


# --- (4) one validator per option: the library and the command line say the same ---------------------------------

CONV = '{"in_channels": 3, "out_channels": 4, "kernel_size": 3}'
BAD = {  # keyword arguments, CLI arguments, exit code (2: rejected while parsing, 1: by build)
    "gn zero": ({"gn": 0}, ["--gn", "0"], 2),
    "gn negative": ({"gn": -3}, ["--gn", "-3"], 2),
    "eps zero": ({"eps": 0.0}, ["--eps", "0"], 2),
    "eps nan": ({"eps": math.nan}, ["--eps", "nan"], 2),
    "style": ({"style": "fancy"}, ["--style", "fancy"], 2),
    "norm": ({"gn": 4, "norm": "bn"}, ["--gn", "4", "--norm", "bn"], 2),
    "norm without gn": ({"norm": "bcn"}, ["--norm", "bcn"], 1),
    "estimate zero": ({"gn": 8, "norm": "bcn", "bcn_estimate": 0.0}, ["--gn", "8", "--norm", "bcn",
                                                                      "--bcn-estimate", "0"], 1),
    "estimate without bcn": ({"gn": 8, "bcn_estimate": 0.1}, ["--gn", "8", "--bcn-estimate", "0.1"], 1),
    "empty include": ({"include": [""]}, ["--include", ""], 1),
    "standardize_frozen not a bool": ({"standardize_frozen": "yes"}, None, None),
    "calibration_steps negative": ({"preserve": True, "calibration_steps": -1}, ["--preserve", "--calibration-steps",
                                                                                 "-1"], 2),
    "calibration_steps not an int": ({"preserve": True, "calibration_steps": 2.5}, None, None),
    "calibration_steps without preserve": ({"calibration_steps": 10}, ["--calibration-steps", "10"], 1),
}  # fmt: skip


@pytest.fixture(scope="module")
def conv_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("options") / "conv.pt"
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), path)
    return path


@pytest.mark.parametrize(("keywords", "args", "exit_code"), BAD.values(), ids=BAD.keys())
def test_a_bad_value_gives_the_same_message_through_the_library_and_the_cli(
    conv_state: Path, keywords: dict, args: list[str], exit_code: int
) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        wsconvert.convert_model(nn.Conv2d(3, 4, 3), **keywords)
    with pytest.raises(InvalidOptionError, match=re.escape(str(caught.value))):
        ConversionOptions.build(**keywords)
    if args is None:  # a library-only bad value (a flag cannot be given a non-bool on the command line)
        return
    result = CliRunner().invoke(main, [str(conv_state), "--arch", "torch.nn:Conv2d", "--arch-kwargs", CONV, *args])
    assert result.exit_code == exit_code, result.output
    assert " ".join(str(caught.value).split()) in " ".join(result.stderr.split())
    assert "Traceback" not in result.output and not (conv_state.parent / "conv.ws.pt").exists()


def _frozen_net() -> nn.Module:
    """A conv with a frozen weight (a fixed operator, like ultralytics' DFL arange conv) before a trainable one."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    net[0].weight.requires_grad_(False)
    return net


FROZEN = {  # keywords, CLI arguments, the convs that get WS
    "default: the frozen conv is left": ({}, [], {"1"}),
    "standardize_frozen=True": ({"standardize_frozen": True}, ["--standardize-frozen"], {"0", "1"}),
}


@pytest.mark.parametrize(("keywords", "args", "standardized"), FROZEN.values(), ids=FROZEN.keys())
def test_frozen_conv_weights_are_left_unless_standardize_frozen(
    tmp_path: Path, keywords: dict, args: list[str], standardized: set[str]
) -> None:
    """Issue 13 point 4: a frozen weight cannot adapt to WS; skipped with the reason, the option standardizes it."""
    from wsconvert.rules.conv import FROZEN_REASON

    report = wsconvert.plan_conversion(_frozen_net(), **keywords)
    assert {c.path for c in report.converted} == standardized
    assert [(s.path, s.reason) for s in report.skipped] == ([] if "0" in standardized else [("0", FROZEN_REASON)])
    converted = wsconvert.convert_model(_frozen_net(), **keywords)
    assert {p for p, m in converted.named_modules() if wsconvert.is_standardized(m)} == standardized
    assert not converted[0].weight.requires_grad  # the flag is left as it was

    torch.save(_frozen_net().state_dict(), tmp_path / "net.pt")
    arch = f"{__name__}:_frozen_net"
    result = CliRunner().invoke(main, [str(tmp_path / "net.pt"), "--arch", arch, "--json", *args])
    assert result.exit_code == 0, result.output
    fresh = wsconvert.convert_model(_frozen_net(), **keywords)
    fresh.load_state_dict(torch.load(tmp_path / "net.ws.pt", weights_only=True), strict=True)
    assert wsconvert.load(tmp_path / "net.ws.pt")[0].weight.requires_grad is False
    assert {p for p, m in wsconvert.load(tmp_path / "net.ws.pt").named_modules() if wsconvert.is_standardized(m)} == (
        standardized
    )


@pytest.mark.parametrize(
    ("keywords", "expected"),
    [
        ({}, ConversionOptions()),
        ({"include": "layer4.*", "norm": "bcn", "gn": 2}, ConversionOptions(gn=2, include=("layer4.*",), norm="bcn")),
        ({"eps": 1, "bcn_estimate": 1, "gn": 1, "norm": "bcn"},
         ConversionOptions(gn=1, eps=1.0, norm="bcn", bcn_estimate=1.0)),
    ],
    ids=["defaults", "normalized", "ints become floats"],
)  # fmt: skip
def test_good_values_are_normalized_by_their_validators(keywords: dict, expected: ConversionOptions) -> None:
    built = ConversionOptions.build(**keywords)
    assert built == expected
    assert isinstance(built.eps, float) and (built.bcn_estimate is None or isinstance(built.bcn_estimate, float))


if __name__ == "__main__":
    README.write_text(README.read_text().replace(_readme_table(), options_table()))
    print(f"updated {README}", file=sys.stderr)
