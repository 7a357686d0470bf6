"""Glue for training engines: the convert-first ordering rule, and Opacus per-sample gradients.

DDP, FSDP2, torch.compile, autocast and the exporters take a converted model as it is (docs/integrations.md),
provided the model is converted *before* it is wrapped: a wrapper captures the modules and parameters it sees
when it wraps (DDP's gradient buckets, FSDP2's DTensor shards, compiled graphs, Opacus's layer hooks), so
``check_unwrapped`` makes convert_model / plan_conversion / bake refuse a wrapped model with the way out.

Opacus does not take a converted model as it is, for a reason in its module walk (opacus 1.5-1.6,
opacus/grad_sample/grad_sample_module.py):
``GradSampleHooks.iterate_submodules`` hooks every module that *directly* owns a trainable parameter, and
``capture_activations_hook`` records a module's inputs only if it directly owns one. A standardized conv
without a bias owns none: its weight lives at ``parametrizations.weight.original``, inside parametrize's
``ParametrizationList``. Opacus therefore hooks the ``ParametrizationList``, whose forward is called with no
input, records no activations, and fails in ``_get_batch_size`` with ``IndexError: list index out of range``.
(A conv with a bias happens to work: Opacus then hooks the conv and its functorch fallback differentiates
through the parametrization.)

``enable_opacus()`` makes Opacus treat every module carrying a WeightStandardization parametrization as one
layer, as it already does for a conv with a bias: the module is hooked, its inputs recorded, and its
per-sample gradients, ``original`` included, computed by Opacus's own functorch path (``torch.func.vmap`` of
``torch.func.grad`` through ``functional_call`` of the module, so the standardization is differentiated per
sample). Modules without a WS parametrization are handled exactly as before.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from torch import nn
from torch.nn.utils import parametrize

from .errors import InvalidOptionError, WSConvertError
from .standardize import WeightStandardization

__all__ = ["check_unwrapped", "enable_opacus", "find_wrapper", "has_standardization"]

# (module, class, what users call it, where the bare model is). Looked up in sys.modules only: a model can
# only contain a wrapper whose module is already imported, and wsconvert imports none of them itself.
_WRAPPERS = (
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "DistributedDataParallel", ".module"),
    ("torch.nn.parallel.data_parallel", "DataParallel", "DataParallel", ".module"),
    ("torch._dynamo.eval_frame", "OptimizedModule", "torch.compile", "._orig_mod"),
    ("torch.distributed.fsdp", "FSDPModule", "FSDP2 fully_shard", "a model built afresh"),
    (
        "torch.distributed.fsdp.fully_sharded_data_parallel",
        "FullyShardedDataParallel",
        "FullyShardedDataParallel",
        "a model built afresh",
    ),
    ("opacus.grad_sample.gsm_base", "AbstractGradSampleModule", "Opacus GradSampleModule", "._module"),
)

_MARK = "_wsconvert_opacus"


def has_standardization(module: nn.Module) -> bool:
    """True if one of ``module``'s own tensors is computed by a WeightStandardization parametrization."""
    if not parametrize.is_parametrized(module):
        return False
    return any(isinstance(p, WeightStandardization) for chain in module.parametrizations.values() for p in chain)


def find_wrapper(model: nn.Module) -> tuple[str, str, str] | None:
    """``(module path, wrapper name, where the bare model is)`` of the first training wrapper in ``model``."""
    kinds = []
    for module_name, class_name, label, bare in _WRAPPERS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type):
            kinds.append((cls, label, bare))
    if not kinds:
        return None
    for path, module in model.named_modules():
        for cls, label, bare in kinds:
            if isinstance(module, cls):
                return path or "the model", label, bare
    return None


def check_unwrapped(model: nn.Module) -> None:
    """Raise InvalidOptionError if ``model`` is, or contains, a DDP / FSDP / torch.compile / Opacus wrapper."""
    found = find_wrapper(model)
    if found is not None:
        path, label, bare = found
        raise InvalidOptionError(
            f"{path} is wrapped by {label}: convert the bare model first, then wrap it (a wrapper captures the "
            f"modules and parameters it sees when it wraps; see docs/integrations.md). Pass the unwrapped model "
            f"({bare}) instead"
        )


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def enable_opacus() -> None:
    """Let Opacus compute per-sample gradients of converted models (hooks and functorch grad-sample modes).

    Call it once, before ``GradSampleModule(model)`` or ``PrivacyEngine.make_private``; calling it again does
    nothing. It patches two names in ``opacus.grad_sample.grad_sample_module`` (the module walk and the
    ``requires_grad`` check of the activation hook) so that a module with a WS parametrization counts as one
    layer. Raises WSConvertError if opacus is not installed or no longer has those names.
    """
    try:
        from opacus.grad_sample import grad_sample_module as gsm
    except ImportError as error:
        raise WSConvertError("enable_opacus() needs Opacus: pip install opacus") from error
    hooks = getattr(gsm, "GradSampleHooks", None)
    original_requires_grad = getattr(gsm, "requires_grad", None)
    if hooks is None or not hasattr(hooks, "iterate_submodules") or original_requires_grad is None:
        raise WSConvertError(
            "this Opacus version has no GradSampleHooks.iterate_submodules / requires_grad to extend "
            "(wsconvert supports Opacus 1.5-1.6); per-sample gradients of standardized convs without a bias "
            "would fail, so pin opacus<1.7 or give those convs a bias"
        )
    if getattr(hooks.iterate_submodules, _MARK, False):
        return
    original_iterate = hooks.iterate_submodules

    def iterate_submodules(self: object, module: nn.Module) -> Iterator[nn.Module]:
        if has_standardization(module) and _trainable(module):
            yield module  # one layer: never descend into its ParametrizationList
            return
        yield from original_iterate(self, module)

    def requires_grad(module: nn.Module, *, recurse: bool = False) -> bool:
        return original_requires_grad(module, recurse=recurse or has_standardization(module))

    for patched, original in ((iterate_submodules, original_iterate), (requires_grad, original_requires_grad)):
        setattr(patched, _MARK, True)
        patched.__wrapped__ = original
    hooks.iterate_submodules = iterate_submodules
    gsm.requires_grad = requires_grad
