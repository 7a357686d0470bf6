"""A short read path for ``conv.weight`` when the eval cache already holds W_hat.

Every read of a parametrized ``conv.weight`` runs ``torch.nn.utils.parametrize``'s generic machinery: the
injected property, a ModuleDict lookup, ``Module.__call__`` of the ParametrizationList, its ``forward``
(``self[0]``, then a ``hasattr`` probe for a second parametrization that raises and catches an
AttributeError), then ``Module.__call__`` of the parametrization itself. With W_hat cached that is all the
work there is, and it is not small: about 11 us per read on a warm interpreter and about 50 us measured
inside a ResNet-18 forward (cold caches between convs), which made eval of a converted, not baked, model
2.5-4 % slower than plain convs on a 2-core CPU (docs/benchmarks.md).

``install(conv)`` wraps the property that parametrize injected into ``conv``'s per-module class: when the
parametrization is a lone WeightStandardization whose cache is valid for the current W (the same key its
``forward`` checks), the cached tensor is returned directly; in every other case parametrize's own getter
runs unchanged. The short path is only taken when skipping the two ``Module.__call__`` layers changes
nothing observable: no module hooks on the ParametrizationList or the parametrization, no global module
hooks, no ``parametrize.cached()`` context, and no grad-recording, tracing or compiling (the cache's own
rule, ``_must_recompute``).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules import module as _module_globals
from torch.nn.utils import parametrize

from .standardize import WeightStandardization, _in_graph_capture

__all__ = ["install"]

_GLOBAL_HOOKS = tuple(
    getattr(_module_globals, name, None)
    for name in (
        "_global_forward_pre_hooks",
        "_global_forward_hooks",
        "_global_forward_hooks_always_called",
        "_global_backward_pre_hooks",
        "_global_backward_hooks",
    )
)


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks or module._backward_hooks
    )


def _cached_weight(conv: nn.Module, name: str) -> Tensor | None:
    """W_hat from the eval cache when parametrize's getter would return exactly it, else None."""
    if _in_graph_capture() or parametrize._cache_enabled or any(_GLOBAL_HOOKS):  # capture first: nothing to guard on
        return None
    chain = conv._modules["parametrizations"]._modules[name]
    if len(chain._modules) != 1 or _has_hooks(chain):
        return None
    ws = chain._modules["0"]
    if type(ws) is not WeightStandardization or _has_hooks(ws):
        return None
    original = chain._parameters.get("original")
    if original is None:
        return None
    return ws.cached_result(original)


def install(conv: nn.Module, name: str = "weight") -> None:
    """Wrap the parametrized property ``name`` of ``conv``'s class with the cached-W_hat short path.

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
        cached = _cached_weight(self, name)
        return cached if cached is not None else parametrize_get(self)

    get_weight._wsconvert_fast = True  # type: ignore[attr-defined]
    get_weight.__doc__ = parametrize_get.__doc__
    setattr(cls, name, property(get_weight, prop.fset, prop.fdel, prop.__doc__))
