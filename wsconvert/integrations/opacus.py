"""Opacus per-sample gradients of converted models.

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

from collections.abc import Iterator

from torch import nn

from ..errors import WSConvertError
from ..ws.detect import has_standardization

__all__ = ["enable_opacus"]

_MARK = "_wsconvert_opacus"


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
