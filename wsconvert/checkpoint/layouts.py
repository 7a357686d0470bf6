"""Checkpoint layouts: where an input keeps its model state dicts and its wsconvert record, and what its converted
output is. One registered handler per layout, asked once by ``convert_checkpoint`` (wsconvert.checkpoint.rewrite).

The built-ins, in registration order: a safetensors state dict, a torch.save state dict, a training checkpoint (a
dict holding state dicts and other entries, e.g. timm's train.py or Lightning's ModelCheckpoint), a whole pickled
nn.Module, a training dict of whole modules (ultralytics' ``model``/``ema``) and a transformers ``save_pretrained``
directory (wsconvert.checkpoint.directory, registered when that module is imported at the end of this one).
``convert_checkpoint`` reads the input (``reader.load_checkpoint``), takes the layout ``layout_of`` finds,
refuses an input that already carries a record (``Layout.record``), rewrites each state dict ``Layout.entries``
names and writes the ``Output`` files ``Layout.assemble`` returns through its one write path (atomic
``reader.write_torch`` / ``reader.write_safetensors``). Another layout is one ``register_layout(MyLayout())``.

Nothing here assumes one input file or one output file: ``Layout.entries`` names state dicts by key (None: the
loaded object itself) and ``assemble`` returns a list of outputs, each at ``output/name`` when it has a ``name``.
A directory input has a reading step of its own (``reader.load_checkpoint`` reads one file): the directory
layout reads config.json and the shards itself and writes a directory atomically (``reader.write_directory_atomic``).
"""

from __future__ import annotations

import copy
import itertools
import json
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._optional import loaded_type
from ..convert import bake as bake_model
from ..convert import convert_measured
from ..errors import ArchitectureError, CheckpointError, InvalidOptionError
from ..integrations import ultralytics as ultralytics_integration
from . import keys as key_maps
from . import reader as ckpt
from .arch import Architecture, arch_from_checkpoint, resolve_arch

__all__ = [
    "OUTPUT_FORMATS",
    "MODULES_FORMAT",
    "WHOLE_MODEL_FORMAT",
    "Entries",
    "Layout",
    "Output",
    "PickledModel",
    "PickledModules",
    "WholeModulesCheckpointLayout",
    "layout_of",
    "register_layout",
    "registered_layouts",
    "unregister_layout",
]

WHOLE_MODEL_FORMAT = "wsconvert-whole-model"
OUTPUT_FORMATS = ("torch.save", "safetensors")
_SHOWN = 3


# --- naming values in messages ---------------------------------------------------------------------


def _short(text: str, limit: int = 80) -> str:
    """``text`` for a one-line message: very long keys keep their start and end and say how long they are."""
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 4 :]} ({len(text):,} characters)"


def _listed(keys: list[str]) -> str:
    shown = ", ".join(_short(str(k)) for k in keys[:_SHOWN])
    return shown + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _described(value: object) -> str:
    """A value named for a message: its type and a short repr (tensors: dtype, layout and shape)."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.layout).replace('torch.', '')} {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__} ({_short(repr(value), 60)})"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


# --- the wsconvert record ------------------------------------------------------------------------


def _is_record(value: object) -> bool:
    """Whether ``value`` is a wsconvert record: a dict of JSON values with a str ``version``."""
    if not isinstance(value, Mapping) or not isinstance(value.get("version"), str):
        return False
    try:
        json.dumps(dict(value), sort_keys=True)
    except (TypeError, ValueError):  # a tensor, an object, a non-str key, ...
        return False
    return True


def checked_record(loaded: ckpt.Loaded, where: str, value: object) -> dict:
    """``value`` (found under a record's name, ``where``) as a record, or CheckpointError: converting would
    overwrite a value that is not a wsconvert record with this run's record."""
    if not _is_record(value):
        raise CheckpointError(
            f"{loaded.path}: {where} is {_described(value)}, which is not a wsconvert record (a dict of JSON values "
            "with a 'version'); wsconvert writes its record under that name: remove or rename the entry, then rerun"
        )
    return dict(value)  # type: ignore[arg-type]


def metadata_record(loaded: ckpt.Loaded, obj: object) -> dict | None:
    """The record a state dict keeps in ``_metadata[METADATA_INFO_KEY]`` (torch keeps ``_metadata`` through
    torch.save), or None."""
    metadata = getattr(obj, "_metadata", None)
    if not isinstance(metadata, Mapping) or ckpt.METADATA_INFO_KEY not in metadata:
        return None
    return checked_record(loaded, f"its _metadata[{ckpt.METADATA_INFO_KEY!r}]", metadata[ckpt.METADATA_INFO_KEY])


def _stamped(rewritten: Mapping[str | None, OrderedDict], info: dict) -> Mapping[str | None, OrderedDict]:
    """Each rewritten state dict with the record in its ``_metadata`` (what ``wsconvert.load`` reads back)."""
    for state_dict in rewritten.values():
        state_dict._metadata[ckpt.METADATA_INFO_KEY] = info  # type: ignore[attr-defined]
    return rewritten


# --- the handler interface -----------------------------------------------------------------------


@dataclass
class Entries:
    """What a layout rewrites: ``models`` (key -> model state dict, in order; key None: the loaded object itself),
    the entries ``kept`` as they are and those ``dropped`` (key, reason)."""

    models: dict[str | None, Mapping[str, torch.Tensor]]
    kept: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Output:
    """One file to write: ``obj`` saved with torch.save, or a str -> tensor dict written as safetensors with
    ``metadata``; at the output path itself (``name`` None) or at ``output/name`` (a layout of several files)."""

    obj: Any
    format: str = "torch.save"
    metadata: dict[str, str] = field(default_factory=dict)
    name: str | None = None

    def __post_init__(self) -> None:
        if self.format not in OUTPUT_FORMATS:
            raise InvalidOptionError(
                f"Output(format={self.format!r}): the write path writes {' or '.join(map(repr, OUTPUT_FORMATS))}"
            )


class Layout:
    """A checkpoint layout. Subclasses set ``name`` (unique in the registry), ``label`` (the layout the conversion
    reports) and ``format`` (the reported file format), and implement ``matches``, ``record``, ``entries`` and
    ``assemble``; the other methods have defaults for layouts that hold state dicts of an ``--arch``.

    ``bake_entries``: ``--bake`` bakes the rewritten state dicts (False: ``assemble`` bakes). ``release_input_pages``:
    the memory-mapped torch.save input's read pages may be dropped while baking and writing.
    """

    name: str = ""
    label: str = ""
    format: str = "torch.save"
    bake_entries: bool = True
    release_input_pages: bool = True

    def matches(self, loaded: ckpt.Loaded) -> bool:
        """Whether this layout handles ``loaded``."""
        raise NotImplementedError

    def record(self, loaded: ckpt.Loaded) -> dict | None:
        """The wsconvert record ``loaded`` carries (it was written by wsconvert), or None. CheckpointError
        (``checked_record``) for a value under the record's name that is not a record."""
        raise NotImplementedError

    def named_architecture(self, loaded: ckpt.Loaded) -> tuple[str, dict] | None:
        """The architecture spec and kwargs the input names itself, or None (then ``--arch`` is needed)."""
        return None

    def architecture(
        self, loaded: ckpt.Loaded, arch: str | None, arch_kwargs: Mapping[str, Any] | None, notes: list[str]
    ) -> Architecture | PickledModel:
        """The model the state dicts belong to: ``--arch`` (with ``--arch-kwargs``), else the one the input
        names; ArchitectureError when neither is there."""
        if arch:
            return resolve_arch(arch, dict(arch_kwargs or {}))
        named = self.named_architecture(loaded)
        if named is None:
            raise ArchitectureError(
                f"{loaded.path} does not name its architecture; pass --arch torchvision:NAME, timm:NAME or "
                "package.module:callable (with --arch-kwargs '{\"num_classes\": N}' when it differs from the default)"
            )
        spec, found_kwargs = named
        kwargs = dict(arch_kwargs) if arch_kwargs else found_kwargs
        notes.append(f"architecture {spec} taken from the checkpoint" + (f" with {kwargs}" if kwargs else ""))
        return resolve_arch(spec, kwargs)

    def subject(self, architecture: Architecture | PickledModel) -> str:
        """What the progress line "planning on ..." names."""
        return architecture.spec

    def calibration_model(self, loaded: ckpt.Loaded, architecture: Architecture | PickledModel) -> nn.Module:
        """The model ``--calibration`` inputs are checked against (their channels)."""
        return architecture.build_skeleton()

    def entries(self, loaded: ckpt.Loaded, architecture: Architecture | PickledModel) -> Entries:
        """The state dicts to rewrite and the entries kept and dropped; CheckpointError when there is none."""
        raise NotImplementedError

    def record_fields(self, architecture: Architecture | PickledModel, entries: Entries, bake: bool) -> dict[str, Any]:
        """What the output's record says about the model, added after the version, options and source."""
        return {
            "arch": architecture.spec,
            "arch_kwargs": _jsonable(architecture.kwargs),
            "dropped": [key for key, _ in entries.dropped],
        }

    def notes(self, bake: bool) -> list[str]:
        """Notes the conversion adds for this layout."""
        return []

    def assemble(
        self,
        loaded: ckpt.Loaded,
        rewritten: Mapping[str | None, OrderedDict],
        info: dict,
        *,
        calibration_data: list[torch.Tensor] | None = None,
    ) -> list[Output]:
        """The files to write: the rewritten state dicts (by ``entries``' keys) put back in place with the
        record ``info``. Called only for a real run (never for a dry run)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# --- the built-in layouts ------------------------------------------------------------------------


class SafetensorsLayout(Layout):
    """A safetensors file: one state dict, its record a JSON string in the file's metadata (safetensors keeps
    str -> str metadata only: huggingface/safetensors docs, "Metadata")."""

    name = "safetensors"
    label = "state dict"
    format = "safetensors"
    release_input_pages = False  # read lazily by safetensors, never memory-mapped by torch

    def matches(self, loaded: ckpt.Loaded) -> bool:
        return loaded.format == "safetensors"

    def record(self, loaded: ckpt.Loaded) -> dict | None:
        if ckpt.INFO_KEY not in loaded.metadata:
            return None
        where = f"its safetensors metadata entry {ckpt.INFO_KEY!r}"
        raw = loaded.metadata[ckpt.INFO_KEY]
        try:
            value = json.loads(raw)
        except ValueError:
            raise CheckpointError(
                f"{loaded.path}: {where} is {_short(repr(raw), 60)}, which is not JSON and so not a wsconvert "
                f"record; wsconvert writes its record under that name: remove or rename the entry, then rerun"
            ) from None
        return checked_record(loaded, where, value)

    def entries(self, loaded: ckpt.Loaded, architecture: Architecture | PickledModel) -> Entries:
        return Entries({None: loaded.obj})

    def assemble(self, loaded, rewritten, info, *, calibration_data=None) -> list[Output]:  # noqa: ANN001
        metadata = ckpt.info_as_metadata(info, loaded.metadata)
        return [Output(_stamped(rewritten, info)[None], "safetensors", metadata)]


class StateDictLayout(Layout):
    """A torch.save state dict (str -> tensor), its record in ``_metadata[METADATA_INFO_KEY]``."""

    name = "state dict"
    label = "state dict"

    def matches(self, loaded: ckpt.Loaded) -> bool:
        return loaded.format != "safetensors" and loaded.kind == "state_dict"

    def record(self, loaded: ckpt.Loaded) -> dict | None:
        return metadata_record(loaded, loaded.obj)

    def entries(self, loaded: ckpt.Loaded, architecture: Architecture | PickledModel) -> Entries:
        return Entries({None: loaded.obj})

    def assemble(self, loaded, rewritten, info, *, calibration_data=None) -> list[Output]:  # noqa: ANN001
        return [Output(_stamped(rewritten, info)[None])]


class TrainingCheckpointLayout(Layout):
    """A dict of str keys holding one or more model state dicts (``MODEL_KEYS``, or any that matches the
    architecture) and other entries; optimizer and scheduler state is dropped (``reader.drop_reason``), the
    record is the entry ``INFO_KEY``. The architecture may be named inside (``arch.arch_from_checkpoint``)."""

    name = "training checkpoint"
    label = "training checkpoint"

    def matches(self, loaded: ckpt.Loaded) -> bool:
        return loaded.kind == "checkpoint"

    def record(self, loaded: ckpt.Loaded) -> dict | None:
        if ckpt.INFO_KEY in loaded.obj:
            return checked_record(loaded, f"its entry {ckpt.INFO_KEY!r}", loaded.obj[ckpt.INFO_KEY])
        return metadata_record(loaded, loaded.obj)

    def named_architecture(self, loaded: ckpt.Loaded) -> tuple[str, dict] | None:
        return arch_from_checkpoint(loaded.obj)

    def entries(self, loaded: ckpt.Loaded, architecture: Architecture | PickledModel) -> Entries:
        models, kept, dropped = [], [], []
        expected: set[str] | None = None
        for key, value in loaded.obj.items():
            if key == ckpt.INFO_KEY:
                continue
            reason = ckpt.drop_reason(key, value)
            if reason:
                dropped.append((key, reason))
            elif ckpt.is_state_dict(value) and key in ckpt.MODEL_KEYS:
                models.append(key)
            elif ckpt.is_state_dict(value):
                if expected is None:
                    expected = set(architecture.build_skeleton().state_dict())
                _, matched = key_maps.match_prefix(list(value), expected)
                (models if matched * 2 >= len(expected) else kept).append(key)
            else:
                kept.append(key)
        if not models:
            raise CheckpointError(
                f"no model state dict found in {loaded.path}: its entries are {_listed(list(loaded.obj))}; expected "
                f"a state dict or a checkpoint holding one under {', '.join(repr(k) for k in ckpt.MODEL_KEYS[:4])}, ..."
            )
        return Entries({key: loaded.obj[key] for key in models}, kept, dropped)

    def assemble(self, loaded, rewritten, info, *, calibration_data=None) -> list[Output]:  # noqa: ANN001
        _stamped(rewritten, info)
        obj = {key: rewritten.get(key, value) for key, value in loaded.obj.items() if key not in info["dropped"]}
        obj[ckpt.INFO_KEY] = info
        return [Output(obj)]


@dataclass
class PickledModel:
    """The architecture of a whole pickled model: the module itself (``--arch`` is not needed)."""

    module: nn.Module
    kwargs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def spec(self) -> str:
        return f"{type(self.module).__module__}.{type(self.module).__qualname__} (pickled)"

    def describe(self) -> str:
        return self.spec

    def build_skeleton(self) -> nn.Module:
        """A deep copy whose parameters and buffers are meta tensors (no data is copied)."""
        module = self.module
        memo: dict[int, Any] = {}
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            meta = tensor.detach().to("meta")
            memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
        try:
            return copy.deepcopy(module, memo)
        except Exception as error:  # deepcopy runs the model's own __deepcopy__/__reduce__ code
            raise CheckpointError(
                f"cannot copy the pickled {type(module).__name__} to plan its conversion: {error}"
            ) from None

    def build(self) -> nn.Module:
        """A deep copy with its tensors (calibration runs it), or CheckpointError."""
        try:
            return copy.deepcopy(self.module)
        except Exception as error:  # deepcopy runs the model's own __deepcopy__/__reduce__ code
            name = type(self.module).__name__
            raise CheckpointError(f"cannot copy the pickled {name} to calibrate it: {error}") from None


class WholeModuleLayout(Layout):
    """A whole pickled nn.Module (read with ``--trust-pickle``), its record the attribute ``_wsconvert_info``.

    torch cannot pickle a module that carries parametrizations (torch/nn/utils/parametrize.py: "Serialization of
    parametrized modules is only supported through state_dict()"), so the output is a dict of the original module,
    the rewritten state dict and the record (``WHOLE_MODEL_FORMAT``, read back by ``wsconvert.load``), or with
    ``--bake`` the converted, baked module itself.
    """

    name = "whole pickled model"
    label = "whole pickled model"
    bake_entries = False  # --bake writes the baked module, converted in ``assemble``
    release_input_pages = False  # the pickle's own code could have changed its tensors while unpickling

    def matches(self, loaded: ckpt.Loaded) -> bool:
        return loaded.kind == "module"

    def record(self, loaded: ckpt.Loaded) -> dict | None:
        if "_wsconvert_info" not in vars(loaded.obj):
            return None
        return checked_record(loaded, "its attribute _wsconvert_info", vars(loaded.obj)["_wsconvert_info"])

    def architecture(self, loaded, arch, arch_kwargs, notes) -> PickledModel:  # noqa: ANN001
        return PickledModel(loaded.obj)

    def subject(self, architecture: Architecture | PickledModel) -> str:
        return "the pickled model"

    def calibration_model(self, loaded: ckpt.Loaded, architecture: Architecture | PickledModel) -> nn.Module:
        return loaded.obj

    def entries(self, loaded: ckpt.Loaded, architecture: Architecture | PickledModel) -> Entries:
        return Entries({None: loaded.obj.state_dict()})

    def record_fields(self, architecture, entries, bake) -> dict[str, Any]:  # noqa: ANN001
        return {"arch": architecture.spec, "format": "baked-module" if bake else WHOLE_MODEL_FORMAT}

    def notes(self, bake: bool) -> list[str]:
        if bake:
            return ["baked whole model: a plain pickled nn.Module, load it with torch.load(path, weights_only=False)"]
        return ["whole-model output: load it with wsconvert.load(path), which returns the converted model"]

    def assemble(self, loaded, rewritten, info, *, calibration_data=None) -> list[Output]:  # noqa: ANN001
        module: nn.Module = loaded.obj
        if info["bake"]:
            # The baked module is the loaded module itself converted (its own tensors), not the planned copy.
            converted = convert_measured(module, **info["options"], inplace=True, calibration_data=calibration_data)
            model = bake_model(converted[0], inplace=True)
            model._wsconvert_info = info
            return [Output(model)]
        # The original module and the rewritten state dict share their tensors: torch.save stores them once.
        return [Output({ckpt.INFO_KEY: info, "module": module, "state_dict": rewritten[None]})]


MODULES_FORMAT = "wsconvert-whole-modules-checkpoint"


def _is_ultralytics_model(module: nn.Module) -> bool:
    base = loaded_type("ultralytics.nn.tasks", "BaseModel")
    return base is not None and isinstance(module, base)


@dataclass
class PickledModules(PickledModel):
    """The architecture of a checkpoint's whole modules: the first one (the others must be the same model).

    An ultralytics model is planned with the trainability ultralytics' trainer gives it (only ``.dfl`` frozen):
    its checkpoints store every module frozen (ModelEMA, strip_optimizer), which the frozen-weight rule would
    otherwise leave unstandardized."""

    def build_skeleton(self) -> nn.Module:
        skeleton = super().build_skeleton()
        if _is_ultralytics_model(self.module):
            with ultralytics_integration.trainable_as_ultralytics_trains(skeleton):
                flags = [p.requires_grad for p in skeleton.parameters()]
            for p, flag in zip(skeleton.parameters(), flags, strict=True):
                p.requires_grad_(flag)
        return skeleton


class WholeModulesCheckpointLayout(Layout):
    """A training checkpoint dict holding whole pickled modules (read with ``--trust-pickle``): ultralytics'
    ``last.pt`` / ``best.pt`` keep the model under ``ema`` and/or ``model`` (half precision; ``model`` is None
    until strip_optimizer copies ``ema`` into it), beside ``optimizer``, ``updates``, ``train_args``, ``epoch``, ...

    Every module entry is converted with the same options (the same architecture is required), optimizer and
    scheduler state is dropped as for other training checkpoints (``reader.drop_reason``), the other entries are
    kept. The output is the same dict with the converted modules in place and the record under ``INFO_KEY`` (and on
    each module as ``_wsconvert_info``). Converted modules are made picklable (wsconvert.integrations.ultralytics:
    unpickling parametrizes them again, so loading needs wsconvert); an ultralytics model also gets the WS-aware
    ``fuse``, so ``YOLO(output)`` predicts, validates, exports and, with ``attach(yolo)``, trains. With ``--bake``
    an ultralytics model is written fused for inference (baked WS, BatchNorms folded, GroupNorms kept: plain
    torch/ultralytics classes) and any other module baked.
    """

    name = "whole modules in a training checkpoint"
    label = "training checkpoint of whole modules"
    bake_entries = False  # the modules are converted (and baked) in ``assemble``
    release_input_pages = False  # the pickle's own code could have changed its tensors while unpickling

    @staticmethod
    def module_keys(loaded: ckpt.Loaded) -> list[str]:
        return [key for key, value in loaded.obj.items() if isinstance(value, nn.Module)]

    def matches(self, loaded: ckpt.Loaded) -> bool:
        return loaded.kind == "checkpoint" and bool(self.module_keys(loaded))

    def record(self, loaded: ckpt.Loaded) -> dict | None:
        if ckpt.INFO_KEY in loaded.obj:
            return checked_record(loaded, f"its entry {ckpt.INFO_KEY!r}", loaded.obj[ckpt.INFO_KEY])
        for key in self.module_keys(loaded):
            found = vars(loaded.obj[key]).get("_wsconvert_info")
            if found is not None:  # e.g. a checkpoint ultralytics saved while training a model converted in Python
                return checked_record(loaded, f"the _wsconvert_info attribute of its entry {key!r}", found)
        return None

    def architecture(self, loaded, arch, arch_kwargs, notes) -> PickledModules:  # noqa: ANN001
        keys = self.module_keys(loaded)
        first = loaded.obj[keys[0]]
        for key in keys[1:]:
            other = loaded.obj[key]
            if type(other) is not type(first) or list(other.state_dict()) != list(first.state_dict()):
                raise CheckpointError(
                    f"{loaded.path}: its whole-module entries {keys[0]!r} ({type(first).__name__}) and {key!r} "
                    f"({type(other).__name__}) are not the same model; wsconvert converts every entry with one plan"
                )
        if arch:
            notes.append(f"--arch {arch} ignored: the checkpoint holds its modules ({', '.join(map(repr, keys))})")
        return PickledModules(first)

    def subject(self, architecture: Architecture | PickledModel) -> str:
        return "the pickled modules"

    def calibration_model(self, loaded: ckpt.Loaded, architecture: Architecture | PickledModel) -> nn.Module:
        return architecture.build()

    def entries(self, loaded: ckpt.Loaded, architecture: Architecture | PickledModel) -> Entries:
        models, kept, dropped = {}, [], []
        for key, value in loaded.obj.items():
            if key == ckpt.INFO_KEY:
                continue
            reason = ckpt.drop_reason(key, value)
            if reason:
                dropped.append((key, reason))
            elif isinstance(value, nn.Module):
                models[key] = value.state_dict()
            else:
                kept.append(key)
        return Entries(models, kept, dropped)

    def record_fields(self, architecture, entries, bake) -> dict[str, Any]:  # noqa: ANN001
        return {
            "arch": architecture.spec,
            "format": MODULES_FORMAT,
            "modules": list(entries.models),
            "dropped": [key for key, _ in entries.dropped],
        }

    def notes(self, bake: bool) -> list[str]:
        if bake:
            return [
                "whole modules written baked (ultralytics: fused for inference, GroupNorms kept): they load with "
                "YOLO(path) / torch.load(path, weights_only=False) without wsconvert, for predict, val and export"
            ]
        return [
            "whole modules written converted: load with YOLO(path) or wsconvert.load(path) (needs wsconvert); before "
            "yolo.train(...) call wsconvert.integrations.ultralytics.attach(yolo) so the trainer converts the model "
            "it builds"
        ]

    def assemble(self, loaded, rewritten, info, *, calibration_data=None) -> list[Output]:  # noqa: ANN001
        record = {k: v for k, v in info.items() if k in ("version", "options", "bake", "source")}
        obj: dict[str, Any] = {}
        for key, value in loaded.obj.items():
            if key in info["dropped"] or key == ckpt.INFO_KEY:
                continue
            if key in rewritten:
                value = self._converted(value, rewritten[key], info, record, calibration_data)
            obj[key] = value
        obj[ckpt.INFO_KEY] = info
        return [Output(obj)]

    @staticmethod
    def _converted(module: nn.Module, state_dict: OrderedDict, info: dict, record: dict, calibration_data) -> nn.Module:  # noqa: ANN001
        """``module`` converted in place as the rewrite planned it, holding the rewritten tensors."""
        ultralytics = _is_ultralytics_model(module)
        context = ultralytics_integration.trainable_as_ultralytics_trains(module) if ultralytics else nullcontext()
        with context:
            convert_measured(module, **info["options"], inplace=True, calibration_data=calibration_data)
        module.load_state_dict(state_dict, strict=True)
        if info["bake"]:
            module = (
                ultralytics_integration.fuse(module, verbose=False) if ultralytics else bake_model(module, inplace=True)
            )
            module._wsconvert_info = record
            return module
        if ultralytics:
            return ultralytics_integration.prepare(module, record)
        module._wsconvert_info = record
        for m in module.modules():
            ultralytics_integration.make_picklable(m)
        return module


# --- the registry --------------------------------------------------------------------------------

_LAYOUTS: list[Layout] = []


def register_layout(layout: Layout) -> Layout:
    """Add ``layout`` to the registry and return it. ``layout_of`` asks the most recently registered layout first,
    so a registered layout takes precedence over the built-ins (which match disjoint inputs)."""
    if not isinstance(layout, Layout):
        raise InvalidOptionError(
            f"register_layout({layout!r}): expected an instance of wsconvert.checkpoint.layouts.Layout"
        )
    if not isinstance(layout.name, str) or not layout.name:
        raise InvalidOptionError(f"register_layout: {type(layout).__name__} has no name; set its name attribute")
    if any(known.name == layout.name for known in _LAYOUTS):
        raise InvalidOptionError(
            f"register_layout: a layout named {layout.name!r} is already registered; pick another name or call "
            f"unregister_layout({layout.name!r}) first"
        )
    _LAYOUTS.append(layout)
    return layout


def unregister_layout(name: str) -> Layout:
    """Remove the layout registered as ``name`` and return it."""
    for index, layout in enumerate(_LAYOUTS):
        if layout.name == name:
            return _LAYOUTS.pop(index)
    raise InvalidOptionError(
        f"unregister_layout({name!r}): no such layout; registered: {', '.join(repr(x.name) for x in _LAYOUTS)}"
    )


def registered_layouts() -> tuple[Layout, ...]:
    """The registered layouts, in registration order (the built-ins first)."""
    return tuple(_LAYOUTS)


def layout_of(loaded: ckpt.Loaded) -> Layout:
    """The layout that handles ``loaded`` (the most recently registered that matches), or CheckpointError."""
    for layout in reversed(_LAYOUTS):
        if layout.matches(loaded):
            return layout
    raise CheckpointError(
        f"{loaded.path}: no checkpoint layout handles this {loaded.format} {loaded.kind.replace('_', ' ')}; "
        f"known layouts: {', '.join(x.name for x in _LAYOUTS)}"
    )


for _builtin in (
    SafetensorsLayout(),
    StateDictLayout(),
    TrainingCheckpointLayout(),
    WholeModuleLayout(),
    WholeModulesCheckpointLayout(),
):
    register_layout(_builtin)
from . import directory as _directory  # noqa: E402, F401 - registers the save_pretrained directory layout
