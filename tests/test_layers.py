"""The package's layers (CONTRIBUTING.md): imports only go downward, ``import wsconvert`` stays light, old paths work.

The import graph is read from the source with ``ast`` (every ``import`` / ``from ... import``, relative or
absolute, at module level or inside functions), so a lazy import counts too; imports under ``if TYPE_CHECKING:``
are annotations only, never run, and do not count.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from wsconvert._moved import MOVED

PACKAGE = Path(__file__).resolve().parents[1] / "wsconvert"

# The layers, lowest first. A module may import modules of its own layer and of the layers below it.
# Entries are module names or subpackages (a subpackage covers its modules; the most specific entry wins, so
# wsconvert.integrations.ultralytics is not in the integrations layer). The package itself
# (wsconvert/__init__.py, the lazy public facade) sits above everything.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("wsconvert.errors", "wsconvert._optional", "wsconvert._moved", "wsconvert._validate")),
    ("ws", ("wsconvert.ws",)),  # the WS math and parametrization, the one "carries WS" predicate
    ("norms", ("wsconvert.norms",)),  # Batch-Channel Normalization
    ("options", ("wsconvert.options",)),
    ("rules", ("wsconvert.rules",)),  # what each layer type becomes
    ("walk", ("wsconvert.walk", "wsconvert.report")),  # visiting the model, applying, the report
    ("probes", ("wsconvert.probes",)),  # forward/fx probes: unnormalized convs, pooled norm layers
    ("preserve", ("wsconvert.preserve",)),  # Adaptive WS, GroupNorm affines, fidelity
    ("integrations", ("wsconvert.integrations",)),  # wrappers (DDP, compile) checked by plan; Opacus
    ("convert", ("wsconvert.plan", "wsconvert.convert", "wsconvert.testing")),
    # third-party training stacks: converting inside their trainers (ultralytics); the checkpoint layouts use it
    ("ecosystem", ("wsconvert.integrations.ultralytics",)),
    ("checkpoint", ("wsconvert.checkpoint",)),  # reading, rewriting and loading checkpoint files
    ("cli", ("wsconvert.cli", "wsconvert.cli_options", "wsconvert.__main__")),
]

# Upward imports that break an import cycle: allowed only inside a function (imported on first call).
LAZY_UPWARD = {
    # BatchChannelNorm's own conversion helper walks a model with walk.find_sites / carry_module_state;
    # walk imports the rules, which import norms.bcn, so a module-level import would be a cycle.
    ("wsconvert.norms.bcn", "wsconvert.walk"),
}

# Upward imports at module level that exist today and should go (each must still exist: delete the entry
# when it is fixed). Empty: keep it so. Imports under ``if TYPE_CHECKING:`` are annotations only and never run.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()

# Names any module may import from the package itself.
FROM_PACKAGE = {"__version__"}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the dotted name as written, made absolute
    imported: str  # the module of the package it resolves to ("wsconvert" for the package itself)
    names: tuple[str, ...]  # what was imported from the package itself, when imported is "wsconvert"
    lazy: bool
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The module ``name`` refers to: itself, or the nearest enclosing module (``a.b.attr`` -> ``a.b``)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy_nodes = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for sub in ast.walk(node)
    }
    type_only = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for sub in ast.walk(node)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        targets: list[tuple[str, tuple[str, ...]]] = []
        if isinstance(node, ast.Import):
            targets = [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from . import walk` imports the module wsconvert.walk
                submodule = f"{source}.{alias.name}"
                targets.append((submodule, ()) if submodule in modules else (source, (alias.name,)))
        for target, names in targets:
            if target == "wsconvert" or target.startswith("wsconvert."):
                imported = _resolve(target, modules)
                if imported != name:
                    found.append(Import(name, target, imported, names, id(node) in lazy_nodes, node.lineno))
    return found


def _graph() -> list[Import]:
    modules = _modules()
    return [imp for name, path in modules.items() for imp in _imports(name, path, modules)]


def _layer(module: str) -> int:
    """Index of ``module``'s layer in LAYERS; len(LAYERS) for the package itself."""
    if module == "wsconvert":
        return len(LAYERS)
    matches = [
        (len(m), index)
        for index, (_, members) in enumerate(LAYERS)
        for m in members
        if module == m or module.startswith(f"{m}.")
    ]
    if matches:
        return max(matches)[1]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py and CONTRIBUTING.md")


def _where(imp: Import) -> str:
    return f"{imp.importer} (line {imp.line}) imports {imp.imported}"


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        _layer(module)


def test_imports_only_go_downward() -> None:
    upward = []
    for imp in _graph():
        if imp.imported == "wsconvert":
            if set(imp.names) - FROM_PACKAGE:
                upward.append(f"{_where(imp)}: {sorted(imp.names)} (import them from their own modules)")
            continue
        if _layer(imp.imported) <= _layer(imp.importer):
            continue
        edge = (imp.importer, imp.imported)
        if edge in KNOWN_VIOLATIONS or (imp.lazy and edge in LAZY_UPWARD):
            continue
        how = "inside a function, not in LAZY_UPWARD" if imp.lazy else "at module level"
        upward.append(f"{_where(imp)} {how}: {LAYERS[_layer(imp.importer)][0]} -> {LAYERS[_layer(imp.imported)][0]}")
    upward = list(dict.fromkeys(upward))  # one line per import statement
    assert not upward, "imports that go up the layers (tests/test_layers.py LAYERS):\n" + "\n".join(upward)


def test_allowlists_are_current() -> None:
    """An allowlisted upward import that no longer exists (or is no longer upward) must leave the list."""
    edges = {(imp.importer, imp.imported) for imp in _graph() if imp.imported != "wsconvert"}
    for edge in sorted(LAZY_UPWARD | KNOWN_VIOLATIONS):
        assert edge in edges, f"{edge[0]} no longer imports {edge[1]}: remove the entry from tests/test_layers.py"
        assert _layer(edge[1]) > _layer(edge[0]), f"{edge} is not upward: remove the entry"


def test_no_module_uses_an_old_flat_path() -> None:
    old = {f"wsconvert.{name}" for name in MOVED}
    uses = [
        f"{_where(imp)} as {written}"
        for imp in _graph()
        for written in (imp.target, *(f"{imp.target}.{n}" for n in imp.names))
        if written in old or any(written.startswith(f"{o}.") for o in old)
    ]
    assert not uses, "old module paths (wsconvert/_moved.py) used inside the package:\n" + "\n".join(uses)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ..errors import WSConvertError", [("wsconvert.errors", ("WSConvertError",))]),
        ("from .. import walk", [("wsconvert.walk", ())]),
        ("from .. import __version__", [("wsconvert", ("__version__",))]),
        ("import wsconvert.ws.standardize as s", [("wsconvert.ws.standardize", ())]),
        ("from wsconvert.report import ConversionReport", [("wsconvert.report", ("ConversionReport",))]),
        ("from ...outside import x\nimport torch\nfrom torch import nn", []),
        ("def f():\n    from ..walk import find_sites", [("wsconvert.walk", ("find_sites",))]),
        ("if TYPE_CHECKING:\n    from ..plan import Step", []),  # annotations only: never imported
    ],
)
def test_the_import_reader(tmp_path: Path, source: str, expected: list[tuple[str, tuple[str, ...]]]) -> None:
    """The reader resolves relative, absolute, package-attribute and lazy imports (read as wsconvert.rules.x)."""
    path = tmp_path / "x.py"
    path.write_text(source)
    found = _imports("wsconvert.rules.x", path, _modules())
    assert [(imp.imported, imp.names) for imp in found] == expected
    assert [imp.lazy for imp in found] == [source.startswith("def")] * len(expected)


def test_import_wsconvert_is_light() -> None:
    """``import wsconvert`` loads no torch and no checkpoint code; convert_model and wsconvert.testing load
    no checkpoint code and no click (the CLI's import is what starts fast; wsconvert/__init__.py)."""
    code = """
import json, sys
def loaded():
    return sorted(m for m in sys.modules if m in ("torch", "click") or m.startswith("wsconvert.checkpoint"))
import wsconvert
steps = {"import wsconvert": loaded()}
wsconvert.convert_model
steps["wsconvert.convert_model"] = loaded()
import wsconvert.testing
steps["import wsconvert.testing"] = loaded()
print(json.dumps(steps))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    steps = json.loads(out.stdout.strip().splitlines()[-1])
    assert steps["import wsconvert"] == []
    assert steps["wsconvert.convert_model"] == ["torch"]
    assert steps["import wsconvert.testing"] == ["torch"]


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_old_flat_paths_are_the_new_modules(old: str, new: str) -> None:
    assert (PACKAGE / (new.replace(".", "/") + ".py")).is_file(), f"wsconvert.{new} does not exist"
    assert importlib.import_module(f"wsconvert.{old}") is importlib.import_module(f"wsconvert.{new}")
    assert sys.modules[f"wsconvert.{old}"].__name__ == f"wsconvert.{new}"


def test_old_flat_path_names_are_the_same_objects() -> None:
    """``from <old path> import name`` gives the very object of the new home (monkeypatching either patches both)."""
    from wsconvert.bcn import EstimatedBatchNorm
    from wsconvert.probe import probe_unnormalized
    from wsconvert.rewrite import convert_checkpoint

    assert EstimatedBatchNorm is importlib.import_module("wsconvert.norms.bcn").EstimatedBatchNorm
    assert probe_unnormalized is importlib.import_module("wsconvert.probes.unnormalized").probe_unnormalized
    assert convert_checkpoint is importlib.import_module("wsconvert.checkpoint.rewrite").convert_checkpoint


def test_no_private_references_in_the_package() -> None:
    """Docstrings and comments cite public sources (papers, repositories, issues), never the workspace."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "../shared" in line or "REFERENCE.md" in line
    ]
    assert not found, "\n".join(found)
