"""``wsconvert.load``: turn a converted whole-model file back into the ready-to-train converted model.

torch cannot pickle a module that carries parametrizations (torch/nn/utils/parametrize.py raises
"Serialization of parametrized modules is only supported through state_dict()"), so for a whole
pickled model ``wsconvert INPUT --trust-pickle`` writes a dict holding the original pickled module, the
conversion options and the converted state dict (the two share their tensors, so the file is no larger
than the input). ``load`` converts the module with the recorded options and loads the state dict
strictly, which yields exactly what ``convert_model`` returns in Python. A ``--bake`` output is a plain
pickled module and is returned as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import INFO_KEY, read_info, sniff
from .convert import convert_model
from .errors import CheckpointError
from .rewrite import WHOLE_MODEL_FORMAT

__all__ = ["load"]


def load(path: str | os.PathLike, *, map_location: Any = "cpu") -> nn.Module:
    """Load a model file written by the ``wsconvert`` command from a whole pickled model.

    Returns the converted model, ready to train (or, for ``--bake`` output, the baked plain module).
    Like ``torch.load(weights_only=False)`` this unpickles Python objects, which runs code from the
    file: only load files you trust. State-dict outputs are refused with a message saying how to load
    them (``convert_model(arch(), **options).load_state_dict(...)``).
    """
    fmt = sniff(path)
    if fmt == "safetensors":
        raise CheckpointError(
            f"{path} is a safetensors state dict; load it into convert_model(arch(), **options) with "
            "load_state_dict (the options are in its 'wsconvert' metadata)"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # unpickling a trusted file can raise anything
        raise CheckpointError(f"cannot load {path}: {type(error).__name__}: {error}") from None
    if isinstance(obj, nn.Module):
        return obj
    info = read_info(obj)
    if isinstance(obj, Mapping) and info is not None and info.get("format") == WHOLE_MODEL_FORMAT:
        if not isinstance(obj.get("module"), nn.Module) or not isinstance(obj.get("state_dict"), Mapping):
            raise CheckpointError(f"{path} is a damaged wsconvert whole-model file (no 'module' or 'state_dict')")
        model = convert_model(obj["module"], **info.get("options", {}), inplace=True)
        model.load_state_dict(obj["state_dict"], strict=True)
        return model
    if info is not None:
        options = json.dumps(info.get("options", {}), sort_keys=True)
        raise CheckpointError(
            f"{path} holds state dicts, not a whole model; build the architecture ({info.get('arch', '?')}), convert "
            f"it with convert_model(model, **{options}) and call load_state_dict on it"
        )
    raise CheckpointError(
        f"{path} was not written by wsconvert from a whole model (no {INFO_KEY!r} record); use torch.load for it"
    )
