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
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ArchitectureError

__all__ = ["Architecture", "resolve_arch", "arch_from_checkpoint", "arch_from_config"]

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


def _transformers(name: str, config: Mapping[str, Any] | None) -> Callable[..., Any]:
    """``transformers:ClassName``: a transformers model class (or an ``Auto...`` class) built from a config.

    With ``config`` (a ``save_pretrained`` directory's config.json as a dict) each build is
    ``cls(config_class.from_dict({**config, **kwargs}))``, the kwargs overriding config attributes; without it
    ``cls(config_class(**kwargs))``. Auto classes build through ``AutoConfig.for_model`` and ``from_config``.
    The weights are random (transformers' own initialization); nothing is downloaded.
    """
    try:
        import transformers
    except ImportError as error:
        raise ArchitectureError(
            f"--arch transformers:{name} needs transformers, which cannot be imported ({error}); pip install it"
        ) from None
    version = getattr(transformers, "__version__", "?")
    if not name.isidentifier():
        raise ArchitectureError(
            f"transformers:{name!r} is not a class name; give a model class, e.g. "
            "transformers:ResNetForImageClassification"
        )
    try:
        cls = getattr(transformers, name)
    except AttributeError:
        choices = [n for n in dir(transformers) if n[:1].isupper()]
        raise ArchitectureError(
            f"transformers {version} has no class named {name!r}{_suggest(name, choices)}; give a model class such as "
            "transformers:ResNetForImageClassification (a newer transformers may have it)"
        ) from None
    except USER_CODE_ERRORS as error:  # a class whose own optional dependency is missing
        raise ArchitectureError(f"transformers:{name} cannot be imported ({_first_line(error)})") from None
    config_class = getattr(cls, "config_class", None)
    auto = callable(getattr(cls, "from_config", None)) and name.startswith("Auto")
    if not auto and not (isinstance(cls, type) and issubclass(cls, nn.Module) and isinstance(config_class, type)):
        raise ArchitectureError(
            f"transformers:{name} is not a model class (a PreTrainedModel subclass with a config_class, or an "
            "AutoModel... class); give one such as transformers:ResNetForImageClassification"
        )
    base = dict(config or {})
    wanted = getattr(config_class, "model_type", "") if not auto else ""
    if wanted and base.get("model_type") not in (None, wanted):
        raise ArchitectureError(
            f"transformers:{name} takes a {wanted!r} config, but config.json is a {base['model_type']!r} config; "
            "leave --arch out to use the class config.json names, or give a class of that model type"
        )

    def factory(**given: Any) -> Any:
        merged = {**base, **given}
        if auto:
            model_type = merged.pop("model_type", None)
            if not isinstance(model_type, str):
                raise ValueError(f"{name} needs a config with a model_type")
            merged.pop("transformers_version", None)
            return cls.from_config(transformers.AutoConfig.for_model(model_type, **merged))
        return cls(config_class.from_dict(merged) if config is not None else config_class(**merged))

    return factory


def arch_from_config(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The architecture a ``save_pretrained`` directory's config.json names, or None.

    transformers writes the model class under ``architectures`` (a list; the first is taken) next to
    ``model_type`` (``PretrainedConfig.save_pretrained``): ``transformers:ClassName``, built from this config.
    timm's hub format writes ``architecture`` and ``num_classes`` (timm ``push_to_hub``): ``timm:NAME``.
    """
    architectures = config.get("architectures")
    if isinstance(config.get("model_type"), str) and isinstance(architectures, list) and architectures:
        first = architectures[0]
        if isinstance(first, str) and first:
            return f"transformers:{first}", {}
        return None
    name = config.get("architecture")
    if isinstance(name, str) and name and "model_type" not in config:
        num_classes = config.get("num_classes")
        valid = isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes > 0
        return f"timm:{name}", ({"num_classes": num_classes} if valid else {})
    return None


def resolve_arch(
    spec: str, kwargs: dict[str, Any] | None = None, *, config: Mapping[str, Any] | None = None
) -> Architecture:
    """Resolve ``torchvision:NAME``, ``timm:NAME``, ``transformers:ClassName`` or ``package.module:callable`` with
    ``kwargs``. ``config`` is the config dict a ``transformers:`` class is built from (a directory's config.json;
    ``kwargs`` then override its attributes)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ArchitectureError("empty --arch; use torchvision:NAME, timm:NAME or package.module:callable")
    kwargs = dict(kwargs or {})
    if not all(isinstance(k, str) for k in kwargs):
        raise ArchitectureError(f"arch kwargs {kwargs!r} must map argument names to values")
    prefix, _, name = spec.partition(":")
    if prefix == "transformers" and name:
        return Architecture(spec, kwargs, _transformers(name, config))
    hint = family_suggestion(spec.strip())
    if hint:
        raise ArchitectureError(
            f"--arch {spec!r} is not torchvision:NAME, timm:NAME or an importable package.module:callable{hint}"
        )
    if prefix == "torchvision":
        factory = _torchvision(name, kwargs)
    elif prefix == "timm":
        factory = _timm(name, kwargs)
    elif prefix == "effdet" and name:
        factory = _effdet(name, kwargs)
    else:
        factory = _callable(spec)
    return Architecture(spec, kwargs, factory)


# --- effdet (rwightman/efficientdet-pytorch) ---------------------------------------------------------------------

# The spec forms --arch accepts, for messages about an architecture a checkpoint names.
ARCH_FORMS = "torchvision:NAME, timm:NAME, effdet:NAME, transformers:ClassName or package.module:callable"


def _effdet_names() -> list[str] | None:
    """The model names effdet's ``create_model`` knows (effdet/config/model_config.py), or None without effdet.

    Looked up for every checkpoint that names its architecture (a timm one too), so importing effdet must stay
    quiet: its modules apply the deprecated ``torch.jit.script`` at import, a FutureWarning that is not the user's.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from effdet.config.model_config import efficientdet_model_param_dict
    except ImportError:
        return None
    return list(efficientdet_model_param_dict)


def _effdet(name: str, kwargs: dict[str, Any]) -> Callable[..., Any]:
    """``effdet:NAME``: ``effdet.create_model(NAME, pretrained=False, pretrained_backbone=False, **kwargs)``, the bare
    EfficientDet that effdet's train.py saves (its CheckpointSaver unwraps the DetBenchTrain: ``unwrap_bench``).
    ``pretrained_backbone`` defaults to True in effdet (a timm download), so it is always False here. Another
    callable of the effdet package (``effdet:create_model``) is taken as ``package.module:callable``."""
    names = _effdet_names()
    if names is None:
        raise ArchitectureError(f"--arch effdet:{name} needs effdet, which is not installed; pip install effdet")
    if name not in names:
        import effdet

        if callable(getattr(effdet, name, None)):
            return _callable(f"effdet:{name}")
        raise ArchitectureError(
            f"effdet has no model named {name!r}{_suggest(name, names)}; see "
            "effdet.config.model_config.efficientdet_model_param_dict"
        )
    for key in ("pretrained", "pretrained_backbone", "checkpoint_path"):
        if kwargs.get(key):
            raise ArchitectureError(
                f"{key}={kwargs[key]!r}: wsconvert builds models with random weights and downloads nothing; the "
                "weights come from the checkpoint"
            )

    def factory(**given: Any) -> Any:
        import effdet

        return effdet.create_model(name, **{**given, "pretrained": False, "pretrained_backbone": False})

    return factory


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _named_candidates(name: str, args: object) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """The specs a checkpoint's ``arch`` entry can mean, with their kwargs from ``args``, and the families looked in.

    timm's CheckpointSaver writes ``arch`` (``args.model``), for timm's train.py and for effdet's, which uses it:
    a timm name (kwargs: ``args.num_classes``) or an effdet name (kwargs: ``args.num_classes`` and
    ``args.redundant_bias``, the two options of effdet's train.py that change the weights' shapes; None: the
    model config's value).
    """
    candidates: list[tuple[str, dict[str, Any]]] = []
    looked: list[str] = []
    num_classes = getattr(args, "num_classes", None)
    if importlib.util.find_spec("timm") is not None:
        looked.append("timm")
        if _model_exists("timm", name):
            candidates.append((f"timm:{name}", {"num_classes": num_classes} if _positive_int(num_classes) else {}))
    names = _effdet_names()
    if names is not None:
        looked.append("effdet")
        if name in names:
            kwargs: dict[str, Any] = {"num_classes": num_classes} if _positive_int(num_classes) else {}
            if isinstance(getattr(args, "redundant_bias", None), bool):
                kwargs["redundant_bias"] = args.redundant_bias  # type: ignore[attr-defined]
            candidates.append((f"effdet:{name}", kwargs))
    return candidates, looked


def _model_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
    from . import reader

    for key in reader.MODEL_KEYS:
        if reader.is_state_dict(checkpoint.get(key)):
            return checkpoint[key]
    return None


def _pick_by_keys(name: str, candidates: list[tuple[str, dict[str, Any]]], checkpoint: Mapping[str, Any]) -> int:
    """The index of the one candidate whose state dict the checkpoint's model entry maps onto completely
    (``key_maps.match_keys``, names and shapes), or ArchitectureError: a name two libraries know is never resolved
    by a preference order, only by the keys."""
    from . import keys as key_maps

    state_dict = _model_state_dict(checkpoint)
    fits: list[int] = []
    if state_dict is not None:
        shapes = {k: list(v.shape) for k, v in state_dict.items()}
        for index, (spec, kwargs) in enumerate(candidates):
            try:
                skeleton = resolve_arch(spec, kwargs).build_skeleton()
            except ArchitectureError:
                continue
            keymap = key_maps.match_keys(shapes, {k: list(v.shape) for k, v in skeleton.state_dict().items()})
            if keymap.complete:
                fits.append(index)
    if len(fits) == 1:
        return fits[0]
    specs = " and ".join(spec for spec, _ in candidates)
    found = "both" if fits else "neither"
    raise ArchitectureError(
        f"the checkpoint's 'arch' entry {name!r} names {specs}, and its state dict matches {found} of them; pass "
        f"--arch to say which (it overrides the checkpoint's name: {ARCH_FORMS})"
    )


def _unresolved(name: str, where: str, looked: list[str], suggestions: list[str]) -> ArchitectureError:
    families = " nor ".join(f"{'an' if family[0] in 'aeiou' else 'a'} {family} model" for family in looked)
    what = f"which is not {families}" if looked else "which cannot be looked up (the library is not installed)"
    return ArchitectureError(
        f"the checkpoint names its architecture {name!r} ({where}), {what}{_suggest(name, suggestions)}; "
        "--arch overrides the name the checkpoint "
        f"gives: pass --arch {ARCH_FORMS} (with --arch-kwargs '{{\"num_classes\": N}}' when it differs from the "
        "default)"
    )


def arch_from_checkpoint(checkpoint: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The architecture a training checkpoint names, or None; ArchitectureError when it names one that cannot be
    resolved here (the message says that ``--arch`` overrides it).

    timm's CheckpointSaver stores the model name under ``arch`` (``args.model``; ``args.num_classes``): timm's
    train.py and effdet's train.py, whose names (``efficientdet_d0``, ``tf_efficientdet_d1``, ...) are effdet
    models (``effdet:NAME``). A name both libraries know is decided by the checkpoint's keys (``_pick_by_keys``).
    The torchvision references store the name as ``args.model`` only.
    """
    args = checkpoint.get("args")
    arch = checkpoint.get("arch")
    if isinstance(arch, str) and arch:
        candidates, looked = _named_candidates(arch, args)
        if not candidates:
            known = _effdet_names() or []
            if "timm" in looked:
                import timm

                known = known + list(timm.list_models())
            raise _unresolved(arch, "its 'arch' entry, written by timm's CheckpointSaver", looked, known)
        return candidates[_pick_by_keys(arch, candidates, checkpoint) if len(candidates) > 1 else 0]
    model = getattr(args, "model", None)
    if isinstance(model, str) and model:
        if not _model_exists("torchvision", model):
            looked = ["torchvision"] if importlib.util.find_spec("torchvision") is not None else []
            names: list[str] = []
            if looked:
                import torchvision.models

                names = list(torchvision.models.list_models())
            raise _unresolved(model, "its args.model, as the torchvision references write it", looked, names)
        return f"torchvision:{model}", {}
    return None
