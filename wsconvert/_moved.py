"""Old flat module paths (``wsconvert.probe``, ``wsconvert.rewrite``, ...) as aliases of their new homes.

wsconvert's modules were flat up to 0.1; they now live in subpackages that show the layers (docs/design.md).
``import wsconvert.probe`` or ``from wsconvert.bcn import EstimatedBatchNorm`` keeps working: the old name
is the very same module object as the new one (``wsconvert.probe is wsconvert.probes.unnormalized``), so
monkeypatching either patches both.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

# old module name (under wsconvert) -> new dotted name (under wsconvert)
MOVED = {
    "standardize": "ws.standardize",
    "cached_weight": "ws.cached_weight",
    "recompute": "ws.recompute",
    "compat": "ws.compat",
    "fsdp": "ws.fsdp",
    "bcn": "norms.bcn",
    "probe": "probes.unnormalized",
    "pooled": "probes.pooled",
    "calibrate": "preserve.calibrate",
    "fidelity": "preserve.fidelity",
    "archive": "checkpoint.archive",
    "rewrite": "checkpoint.rewrite",
    "arch": "checkpoint.arch",
    "wholemodel": "checkpoint.wholemodel",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # the import system set the alias's spec on the real module: undo it


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves ``wsconvert.<old>`` to ``wsconvert.<new>`` for the names in ``MOVED``."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != self.package or name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(f"{self.package}.{MOVED[name]}"))


def install(package: str) -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder(package))
