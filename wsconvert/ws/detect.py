"""The one answer to "does this module carry Weight Standardization?", used by every layer of wsconvert."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from .standardize import WeightStandardization

__all__ = ["has_standardization", "only_standardization", "standardization"]


def standardization(module: nn.Module, name: str = "weight", *, alone: bool = False) -> WeightStandardization | None:
    """The WeightStandardization parametrizing ``module.<name>``, or None.

    With ``alone=True`` only a chain holding that one parametrization counts (what the eval cache, the
    recompute hooks, preserve's gain/shift and bake rely on: W_hat is then the tensor the module reads).
    """
    if not parametrize.is_parametrized(module, name):
        return None
    chain = module.parametrizations[name]
    if alone:
        return chain[0] if len(chain) == 1 and isinstance(chain[0], WeightStandardization) else None
    return next((p for p in chain if isinstance(p, WeightStandardization)), None)


def only_standardization(module: nn.Module, name: str = "weight") -> bool:
    """True when every parametrization of ``module.<name>`` is a WeightStandardization (bake removes those)."""
    if not parametrize.is_parametrized(module, name):
        return False
    chain = module.parametrizations[name]
    return len(chain) > 0 and all(isinstance(p, WeightStandardization) for p in chain)


def has_standardization(module: nn.Module) -> bool:
    """True if one of ``module``'s own tensors is computed by a WeightStandardization parametrization."""
    if not parametrize.is_parametrized(module):
        return False
    return any(standardization(module, name) is not None for name in module.parametrizations)
