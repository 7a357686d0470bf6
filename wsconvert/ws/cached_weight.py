"""A short read path for ``conv.weight`` when the eval cache already holds W_hat.

Every read of a parametrized ``conv.weight`` runs ``torch.nn.utils.parametrize``'s generic machinery: the
injected property, a ModuleDict lookup, ``Module.__call__`` of the ParametrizationList, its ``forward``
(``self[0]``, then a ``hasattr`` probe for a second parametrization that raises and catches an
AttributeError), then ``Module.__call__`` of the parametrization itself. With W_hat cached that is all the
work there is, and it is not small: about 11 us per read on a warm interpreter, and 40-65 us inside a real
forward, where each read follows a conv kernel that evicted the CPU caches (ResNet-18/50 on a 2-core CPU:
0.8-1.3 ms and 3-3.5 ms per forward, about 2 % of it; measured by scripts/bench_overhead.py). A plain conv's
weight read costs 3-4 us there.

``install(conv)`` wraps the property that parametrize injected into ``conv``'s per-module class: when the
parametrization is a lone WeightStandardization whose cache is valid for the current W (the same key its
``forward`` checks), the cached tensor is returned directly; in every other case parametrize's own getter
runs unchanged. The short path is only taken when skipping the two ``Module.__call__`` layers changes
nothing observable: no module hooks on the ParametrizationList or the parametrization, no global module
hooks, no ``parametrize.cached()`` context, and no grad-recording, tracing or compiling (the cache's own
rule). The getter is one flat function with pre-bound helpers and a four-field cache key, because in that
cold setting every Python call and attribute lookup costs microseconds: it halves the read cost inside a
forward (ResNet-50: 3.3 -> 1.6 ms per forward) and takes about 4 us warm.

The wrapped property's setter handles ``conv.weight = X`` (a tensor or a Parameter): X's values are copied into
the trained weight W (``WeightStandardization.right_inverse`` is the identity), as ``load_state_dict`` of a
plain checkpoint does; ``check_assignment`` first refuses an X without W's shape, dtype and device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals
from torch.nn.utils import parametrize

from ..errors import WSConvertError
from .standardize import WeightStandardization

__all__ = ["check_assignment", "install"]

# Forward hooks are what Module.__call__ would run on a cache hit. Backward hooks cannot fire there: the short
# path only serves reads that record no gradient. (Always-called forward hooks are also in _forward_hooks.)
_GLOBAL_FORWARD_PRE_HOOKS = _module_globals._global_forward_pre_hooks
_GLOBAL_FORWARD_HOOKS = _module_globals._global_forward_hooks


def install(conv: nn.Module, name: str = "weight") -> None:
    """Wrap the parametrized property ``name`` of ``conv``'s class: the cached-W_hat short path, the assignment check.

    Idempotent; a class whose property is not parametrize's plain property is left alone. The class is
    parametrize's per-module subclass (which deepcopies share), and the wrapper reads everything from the
    instance, so sharing it is harmless; ``remove_parametrizations`` deletes it together with the property.
    """
    cls = type(conv)
    prop = cls.__dict__.get(name)
    if not isinstance(prop, property) or prop.fget is None or getattr(prop.fget, "_wsconvert_fast", False):
        return
    parametrize_get = prop.fget

    def get_weight(self: nn.Module) -> Tensor:
        # One flat function on purpose: it runs once per conv per eval forward, right after the previous
        # conv's kernels have evicted the caches, where every extra Python call costs microseconds.
        if not (parametrize._cache_enabled or _GLOBAL_FORWARD_PRE_HOOKS or _GLOBAL_FORWARD_HOOKS):
            chain = self._modules["parametrizations"]._modules[name]
            if len(chain._modules) == 1 and not (chain._forward_pre_hooks or chain._forward_hooks):
                ws = chain._modules["0"]
                if type(ws) is WeightStandardization and not (ws._forward_pre_hooks or ws._forward_hooks):
                    original = chain._parameters.get("original")
                    cached = None if original is None else ws.cached_result(original)
                    if cached is not None:
                        return cached
        return parametrize_get(self)

    parametrize_set = prop.fset

    def set_weight(self: nn.Module, value: object) -> None:
        # conv.weight = X: X's values become the trained weight W, copied into W as load_state_dict of a plain
        # checkpoint copies them (W keeps its identity, storage and layout; X is not aliased).
        chain = self._modules["parametrizations"]._modules[name]
        ws = chain._modules["0"]
        if len(chain._modules) != 1 or not isinstance(ws, WeightStandardization):
            parametrize_set(self, value)
            return
        original = chain.original
        check_assignment(self, name, original, value)
        with torch.no_grad():
            original.copy_(ws.right_inverse(value))  # copy_ bumps W's version; right_inverse clears the cache

    get_weight._wsconvert_fast = True  # type: ignore[attr-defined]
    get_weight.__doc__ = parametrize_get.__doc__
    setter = None if parametrize_set is None else set_weight
    setattr(cls, name, property(get_weight, setter, prop.fdel, prop.__doc__))
    if "__setattr__" not in cls.__dict__:
        cls.__setattr__ = _parameter_assignment_through_property(cls)


def _parameter_assignment_through_property(cls: type) -> Callable[[nn.Module, str, object], None]:
    """``__setattr__`` that lets ``conv.weight = some_parameter`` reach the property's setter.

    ``nn.Module.__setattr__`` sends every Parameter to ``register_parameter``, which raises a KeyError because
    the name is now a property; a plain conv accepts ``conv.weight = other_conv.weight``, so this one does too.
    Every other assignment goes to the class's own ``__setattr__`` unchanged.
    """
    base_setattr = super(cls, cls).__setattr__

    def __setattr__(self: nn.Module, attr: str, value: object) -> None:
        if isinstance(value, nn.Parameter):
            prop = type(self).__dict__.get(attr)
            if isinstance(prop, property) and getattr(prop.fget, "_wsconvert_fast", False) and prop.fset:
                prop.fset(self, value)
                return
        base_setattr(self, attr, value)

    return __setattr__


def check_assignment(conv: nn.Module, name: str, weight: Tensor, value: object) -> None:
    """Refuse ``conv.weight = X`` unless X can become W: a tensor of W's shape, dtype and device.

    parametrize would otherwise ``set_`` W onto any shape (a (6, 4, 1, 1) tensor turns a 3x3 conv into a 1x1
    conv without a word) and report other mismatches in its own terms.
    """
    where = f"{type(conv).__name__}.{name}"
    expected = f"{tuple(weight.shape)} {weight.dtype} on {weight.device}"
    if not isinstance(value, Tensor):
        raise WSConvertError(
            f"cannot assign a {type(value).__name__} to the weight-standardized {where}: assign a tensor of shape "
            f"{expected} (it becomes the trained weight W; reading {name} then gives WS(W))"
        )
    if value.shape != weight.shape or value.dtype != weight.dtype or value.device != weight.device:
        raise WSConvertError(
            f"cannot assign a tensor of shape {tuple(value.shape)} {value.dtype} on {value.device} to the "
            f"weight-standardized {where}, whose weight W is {expected}: assign a tensor of that shape, dtype and "
            f"device ({name} = X makes X the trained weight W; reading {name} then gives WS(X))"
        )
