"""``wsconvert.load``: turn any file the ``wsconvert`` command wrote back into the ready-to-train converted model.

Every output carries a record of its conversion (``wsconvert.checkpoint.INFO_KEY``: a training checkpoint's
``"wsconvert"`` entry, a safetensors file's ``"wsconvert"`` metadata, a state dict's
``_metadata["__wsconvert__"]``) holding the architecture spec, its keyword arguments and the options. For
state-dict, training-checkpoint and safetensors outputs ``load`` builds the architecture from that record
(random weights, nothing downloaded), converts it with the recorded options and loads the weights with
``strict=True``: the same model as ``convert_model(arch(**arch_kwargs), **options)`` plus
``load_state_dict``. These files are read with the project's safe loader (tensors only, no code runs).

torch cannot pickle a module that carries parametrizations (torch/nn/utils/parametrize.py raises
"Serialization of parametrized modules is only supported through state_dict()"), so for a whole pickled
model ``wsconvert INPUT --trust-pickle`` writes a dict holding the original pickled module, the options and
the converted state dict; ``load`` converts the module with the recorded options and loads the state dict
strictly. That file, and a ``--bake`` output of a whole model (a plain pickled module, returned as it is),
are unpickled, which runs code from the file. So is a training checkpoint of whole modules (ultralytics' ``last.pt``
/ ``best.pt``): its converted modules pickle themselves (wsconvert.integrations.ultralytics) and ``load`` returns
the main one, as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..convert import convert_model
from ..errors import ArchitectureError, CheckpointError, InvalidOptionError
from . import keys as key_maps
from . import reader as ckpt
from .arch import resolve_arch
from .layouts import MODULES_FORMAT
from .rewrite import WHOLE_MODEL_FORMAT

__all__ = ["load", "MAIN_ENTRIES"]

# The training-checkpoint entries ``load`` takes the model from, in this order: the trained model, never an EMA
# copy (``state_dict_ema``, ``model_ema``, ``ema``); pass ``entry=`` for another rewritten entry.
MAIN_ENTRIES = tuple(key for key in ckpt.MODEL_KEYS if "ema" not in key)


def moved(model: nn.Module, map_location: Any, caller: str = "wsconvert.load") -> nn.Module:
    """``model`` on the device ``map_location`` names (None: where it is); InvalidOptionError for anything else
    (a callable or dict, which torch.load takes but ``.to()`` does not)."""
    if map_location is None:
        return model
    if not isinstance(map_location, (str, torch.device)):
        raise InvalidOptionError(
            f"map_location={map_location!r}: {caller} moves the model with .to(); give a device "
            "such as 'cpu', 'cuda:0' or torch.device(...)"
        )
    return model.to(map_location)


def _record(loaded: ckpt.Loaded) -> dict | None:
    if loaded.format == "safetensors":
        raw = loaded.metadata.get(ckpt.INFO_KEY)
        try:
            record = json.loads(raw) if raw is not None else None
        except ValueError:
            record = None
        return record if isinstance(record, dict) else None
    if loaded.kind == "module":
        info = vars(loaded.obj).get("_wsconvert_info")
        return dict(info) if isinstance(info, Mapping) else None
    return ckpt.read_info(loaded.obj)


def _pick_entry(obj: Mapping[str, Any], entry: str | None, path: Any) -> str:
    rewritten = [k for k, v in obj.items() if ckpt.is_state_dict(v) and ckpt.read_info(v) is not None]
    if entry is not None:
        if entry not in rewritten:
            raise CheckpointError(
                f"{path} has no rewritten model entry {entry!r}; its rewritten entries are "
                f"{', '.join(repr(k) for k in rewritten) or 'none'}"
            )
        return entry
    for key in MAIN_ENTRIES:
        if key in rewritten:
            return key
    others = [k for k in rewritten if "ema" not in k.lower()] or rewritten
    if not others:
        raise CheckpointError(f"{path} holds no model state dict rewritten by wsconvert (entries: {', '.join(obj)})")
    return others[0]


def _pick_module(obj: Mapping[str, Any], entry: str | None, path: Any) -> nn.Module:
    """The module of a whole-modules checkpoint: ``entry``, else the first of ``MAIN_ENTRIES`` holding a module,
    else the first module entry (ultralytics keeps its trained model under ``ema`` until strip_optimizer)."""
    modules = [key for key, value in obj.items() if isinstance(value, nn.Module)]
    if entry is not None:
        if entry not in modules:
            raise CheckpointError(
                f"{path} has no module entry {entry!r}; its module entries are "
                f"{', '.join(map(repr, modules)) or 'none'}"
            )
        return obj[entry]
    if not modules:
        raise CheckpointError(f"{path} is a damaged wsconvert whole-modules checkpoint (no module entry)")
    return obj[next((key for key in MAIN_ENTRIES if key in modules), modules[0])]


def load(path: str | os.PathLike, *, map_location: Any = "cpu", entry: str | None = None) -> nn.Module:
    """Load any model file written by the ``wsconvert`` command as the converted, ready-to-train model.

    State dict, training checkpoint and safetensors outputs: the architecture and every option come from the
    file's wsconvert record, the weights are loaded with ``strict=True``; they are read without running code.
    A training checkpoint gives its main model entry, the first of ``MAIN_ENTRIES`` (``state_dict``, ``model``,
    ...: never the EMA copy) present; ``entry="state_dict_ema"`` picks another rewritten entry. Whole-model
    outputs (``--trust-pickle``) are unpickled, which runs code from the file: only load files you trust; a
    ``--bake`` output of a whole model is returned as the plain module it is. A training checkpoint of whole
    modules (ultralytics) gives ``entry``, else its ``model`` entry when it holds a module, else its ``ema``.
    ``map_location`` is the device the model is moved to (None: leave it on the CPU where it was read).

    Raises CheckpointError when the file has no wsconvert record (use ``convert_model`` +
    ``load_state_dict``), for a baked state dict (load it into the plain architecture), and
    ArchitectureError when the recorded architecture cannot be built.

    A directory written by ``wsconvert DIR`` (a transformers ``save_pretrained`` directory, converted) is loaded
    by ``wsconvert.checkpoint.directory.load_pretrained``: the converted model, in eval mode.
    """
    if ckpt.not_a_regular_file(path) == "a directory":
        if entry is not None:
            raise InvalidOptionError(f"entry={entry!r}: {path} is a directory, not a training checkpoint")
        from .directory import load_pretrained

        return load_pretrained(path, map_location=map_location)
    loaded = ckpt.load_checkpoint(path, trust_pickle=True)
    record = _record(loaded)
    if loaded.kind == "module":
        return moved(loaded.obj, map_location)
    if record is None:
        raise CheckpointError(
            f"{path} was not written by wsconvert (no {ckpt.INFO_KEY!r} record of the architecture and options); "
            "build the model, convert it with convert_model(model, **options) and call load_state_dict on it"
        )
    obj = loaded.obj
    if record.get("format") == MODULES_FORMAT:
        return moved(_pick_module(obj, entry, path), map_location)
    if record.get("format") == WHOLE_MODEL_FORMAT:
        if not isinstance(obj.get("module"), nn.Module) or not isinstance(obj.get("state_dict"), Mapping):
            raise CheckpointError(f"{path} is a damaged wsconvert whole-model file (no 'module' or 'state_dict')")
        model = convert_model(obj["module"], **record.get("options", {}), inplace=True)
        model.load_state_dict(obj["state_dict"], strict=True)
        return moved(model, map_location)
    options = dict(record.get("options") or {})
    spec, kwargs = record.get("arch"), record.get("arch_kwargs") or {}
    if record.get("bake"):
        raise CheckpointError(
            f"{path} is a --bake output: its standardized weights are plain conv weights; load it with "
            f"load_state_dict into the unconverted architecture ({spec} {json.dumps(kwargs)}), converted with "
            f"only its norm options (gn/norm) if any, or rerun wsconvert without --bake"
        )
    if not isinstance(spec, str) or not spec:
        raise ArchitectureError(f"{path}: its wsconvert record names no architecture ('arch'); it may be damaged")
    try:
        architecture = resolve_arch(spec, dict(kwargs))
    except ArchitectureError as error:
        raise ArchitectureError(
            f"{path} records the architecture {spec!r}, which cannot be built here: {error}"
        ) from None
    if loaded.kind == "checkpoint":
        key = _pick_entry(obj, entry, path)
        where, state_dict = f"{path} entry {key!r}", obj[key]
    else:
        if entry is not None:
            raise InvalidOptionError(f"entry={entry!r}: {path} is a single state dict, not a training checkpoint")
        where, state_dict = str(path), obj
    model = convert_model(architecture.build(), **options, inplace=True)
    expected = set(model.state_dict())
    prefix, _ = key_maps.match_prefix(list(state_dict), expected)
    own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(own, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{where} does not load into {architecture.describe()} converted with {json.dumps(options)}: "
            f"{' '.join(str(error).split())[:300]}"
        ) from None
    return moved(model, map_location)
