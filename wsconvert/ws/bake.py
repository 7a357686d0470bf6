"""Baking one conv: its WS parametrization replaced by the current standardized weight, a plain Parameter again.

``wsconvert.bake`` (wsconvert.convert) runs this on every standardized conv of a model, then bakes the
Batch-Channel Normalization layers (wsconvert.norms.bcn).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import compat
from .adaptive import remove_gain_shift_hook
from .detect import only_standardization

__all__ = ["bake_conv", "own_parametrized_class"]


def own_parametrized_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of its ``Parametrized<Cls>`` class.

    parametrize creates that class per module, but ``copy.deepcopy`` shares it between the original and
    the copy, and ``remove_parametrizations`` deletes the property from the class (``register_parametrization``
    adds one): without this, baking or converting a copy would break the original model.
    """
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def bake_conv(module: nn.Module) -> bool:
    """Bake ``module`` if every parametrization of its weight is a WeightStandardization; True when it did.

    The weight becomes W_hat (W_eff with Adaptive WS gain/shift) as a plain Parameter; the load hooks that
    only served the parametrization are removed. Call it without recompute_in_backward hooks on the module.
    """
    if not only_standardization(module):
        return False
    with torch.no_grad():
        own_parametrized_class(module)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    compat.remove_plain_weight_hook(module)
    remove_gain_shift_hook(module)  # the baked weight is W_eff: nothing left to fill
    return True
