"""Architecture specs: ``torchvision:NAME``, ``timm:NAME`` or ``package.module:callable`` plus keyword arguments.

A state dict needs the model it belongs to. Models are always built with random weights (torchvision
``weights=None`` and ``weights_backbone=None``, timm ``pretrained=False``): nothing is downloaded. They are
built on the meta device when the constructor allows it, so that planning a conversion allocates no
parameter memory; constructors that need real tensors (e.g. ``torch.linspace(...).tolist()``) fall back
to the CPU.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ArchitectureError

__all__ = ["Architecture", "resolve_arch", "arch_from_checkpoint"]

_PREFIXES = ("torchvision", "timm")

# What importing, reading and calling user code (``--arch package.module:callable``) may raise and is reported
# as one ArchitectureError: any Exception, and SystemExit (a script that parses sys.argv or calls exit() when
# imported). KeyboardInterrupt is not caught: Ctrl-C stays Ctrl-C (the CLI prints ``Aborted!``).
USER_CODE_ERRORS: tuple[type[BaseException], ...] = (Exception, SystemExit)


def _first_line(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


@dataclass
class Architecture:
    """A resolved spec: ``build()`` returns a fresh model with random weights."""

    spec: str
    kwargs: dict[str, Any]
    factory: Callable[..., Any]
    notes: list[str] = field(default_factory=list)

    def build(self) -> nn.Module:
        """The model on the CPU, with random weights."""
        return self._call()

    def build_skeleton(self) -> nn.Module:
        """The model on the meta device (no memory for weights), or on the CPU when that fails."""
        try:
            with torch.device("meta"):
                model = self.factory(**self.kwargs)
            if isinstance(model, nn.Module):
                return model
        except USER_CODE_ERRORS as error:  # constructors that compute with tensor values cannot run on meta
            note = f"{self.spec} could not be built on the meta device ({type(error).__name__}); built on the CPU"
            if note not in self.notes:
                self.notes.append(note)
        return self._call()

    def _call(self) -> nn.Module:
        try:
            model = self.factory(**self.kwargs)
        except USER_CODE_ERRORS as error:  # user and library constructors can raise anything
            raise ArchitectureError(
                f"building {self.spec} with arch kwargs {self.kwargs} failed ({_first_line(error)}); "
                "check --arch-kwargs"
            ) from None
        if not isinstance(model, nn.Module):
            raise ArchitectureError(
                f"{self.spec} returned a {type(model).__name__}, not a torch.nn.Module; point --arch at a model "
                "constructor"
            )
        return model

    def describe(self) -> str:
        return self.spec + (f" {self.kwargs}" if self.kwargs else "")


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _torchvision(name: str, kwargs: dict[str, Any]) -> Callable[..., Any]:
    import torchvision.models as models

    available = models.list_models()
    if name not in available:
        raise ArchitectureError(
            f"torchvision has no model named {name!r}{_suggest(name, available)}; see torchvision.models.list_models()"
        )
    builder = models.get_model_builder(name)
    parameters = inspect.signature(builder).parameters
    defaults = {"weights": None}
    if "weights_backbone" in parameters:  # detection/segmentation builders download a backbone by default
        defaults["weights_backbone"] = None
    for key in ("weights", "weights_backbone"):
        if kwargs.get(key) is not None:
            raise ArchitectureError(
                f"{key}={kwargs[key]!r}: wsconvert builds models with random weights and downloads nothing; "
                "the weights come from the checkpoint"
            )

    def factory(**given: Any) -> Any:
        return builder(**{**defaults, **given})

    return factory


def _timm(name: str, kwargs: dict[str, Any]) -> Callable[..., Any]:
    import timm

    if not timm.is_model(name):
        raise ArchitectureError(
            f"timm has no model named {name!r}{_suggest(name, timm.list_models())}; see timm.list_models()"
        )
    if kwargs.get("pretrained"):
        raise ArchitectureError("pretrained=True: wsconvert builds models with random weights and downloads nothing")

    def factory(**given: Any) -> Any:
        return timm.create_model(name, **{**given, "pretrained": False})

    return factory


def _callable(spec: str) -> Callable[..., Any]:
    """Import ``package.module`` and look up ``callable`` (dotted attributes allowed) of ``package.module:callable``.

    Importing runs the module's code: whatever it raises (USER_CODE_ERRORS) becomes one ArchitectureError
    naming the module and the exception's type and first line.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ArchitectureError(
            f"--arch {spec!r} is not a spec; use torchvision:NAME, timm:NAME or package.module:callable"
        )
    if module_name.startswith("."):
        raise ArchitectureError(
            f"--arch {spec!r}: {module_name!r} is a relative module name, which has no package to be relative to; "
            "give the absolute module path, e.g. package.module:callable"
        )
    if "/" in module_name or "\\" in module_name or module_name.endswith(".py"):
        raise ArchitectureError(
            f"--arch {spec!r}: {module_name!r} is a file path; give the module's dotted name (e.g. models.resnet "
            "for models/resnet.py), importable from the current directory or PYTHONPATH"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ArchitectureError(f"--arch {spec!r}: cannot import {module_name!r} ({error})") from None
    except USER_CODE_ERRORS as error:
        raise ArchitectureError(
            f"--arch {spec!r}: importing {module_name!r} failed ({_first_line(error)}); fix the module or pick "
            "another --arch"
        ) from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ArchitectureError(f"--arch {spec!r}: {module_name} has no attribute {attribute!r}") from None
        except USER_CODE_ERRORS as error:  # a module-level __getattr__ or a property
            raise ArchitectureError(
                f"--arch {spec!r}: reading {attribute!r} of {module_name} failed ({_first_line(error)})"
            ) from None
    if not callable(target):
        kind = type(target).__name__
        raise ArchitectureError(
            f"--arch {spec!r}: {attribute} is {'an' if kind[:1] in 'aeiou' else 'a'} {kind}, not a callable; "
            "point --arch at a function or class that returns the model"
        )
    return target


def _model_exists(family: str, name: str) -> bool:
    """Whether ``family`` (torchvision or timm) is installed and has a model ``name``."""
    try:
        if family == "torchvision":
            import torchvision.models as models

            return name in models.list_models()
        import timm

        return bool(timm.is_model(name))
    except ImportError:
        return False


def family_suggestion(spec: str) -> str | None:
    """The specs a mistyped ``--arch`` probably meant, as " (did you mean X?)", or None.

    A family typo (``tim:resnet18``, ``torchvison:resnet18``: a module prefix that is not importable and is close
    to ``timm`` or ``torchvision``) and a bare model name (``resnet18``) are answered with the
    ``torchvision:NAME`` / ``timm:NAME`` specs whose model exists.
    """
    prefix, colon, name = spec.partition(":")
    if colon:
        if prefix in _PREFIXES or not name or importlib.util.find_spec(prefix.split(".")[0] or "_") is not None:
            return None
        families = difflib.get_close_matches(prefix.lower(), _PREFIXES, n=2, cutoff=0.6)
    else:
        name, families = spec, list(_PREFIXES)
    found = [f"{family}:{name}" for family in families if _model_exists(family, name)]
    return f" (did you mean {' or '.join(found)}?)" if found else None


def resolve_arch(spec: str, kwargs: dict[str, Any] | None = None) -> Architecture:
    """Resolve ``torchvision:NAME``, ``timm:NAME`` or ``package.module:callable`` with ``kwargs``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ArchitectureError("empty --arch; use torchvision:NAME, timm:NAME or package.module:callable")
    kwargs = dict(kwargs or {})
    if not all(isinstance(k, str) for k in kwargs):
        raise ArchitectureError(f"arch kwargs {kwargs!r} must map argument names to values")
    prefix, _, name = spec.partition(":")
    hint = family_suggestion(spec.strip())
    if hint:
        raise ArchitectureError(
            f"--arch {spec!r} is not torchvision:NAME, timm:NAME or an importable package.module:callable{hint}"
        )
    if prefix == "torchvision":
        factory = _torchvision(name, kwargs)
    elif prefix == "timm":
        factory = _timm(name, kwargs)
    else:
        factory = _callable(spec)
    return Architecture(spec, kwargs, factory)


def arch_from_checkpoint(checkpoint: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The architecture a training checkpoint names, or None.

    timm train.py stores the model name under ``arch`` (and ``args.num_classes``); the torchvision
    references store it as ``args.model``.
    """
    args = checkpoint.get("args")
    kwargs: dict[str, Any] = {}
    arch = checkpoint.get("arch")
    if isinstance(arch, str) and arch:
        num_classes = getattr(args, "num_classes", None)
        if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes > 0:
            kwargs["num_classes"] = num_classes
        return f"timm:{arch}", kwargs
    model = getattr(args, "model", None)
    if isinstance(model, str) and model:
        return f"torchvision:{model}", kwargs
    return None
