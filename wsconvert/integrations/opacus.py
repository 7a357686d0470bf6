"""Opacus per-sample gradients of converted models, with or without preserve's gain/shift buffers.

Opacus does not take a converted model as it is, for two reasons in its module walk and checks (opacus 1.5-1.6,
opacus/grad_sample/grad_sample_module.py and opacus/grad_sample/functorch.py):

1. ``GradSampleHooks.iterate_submodules`` hooks every module that *directly* owns a trainable parameter, and
   ``capture_activations_hook`` records a module's inputs only if it directly owns one. A standardized conv
   without a bias owns none: its weight lives at ``parametrizations.weight.original``, inside parametrize's
   ``ParametrizationList``. Opacus therefore hooks the ``ParametrizationList``, whose forward is called with no
   input, records no activations, and fails in ``_get_batch_size`` with ``IndexError: list index out of range``.
   (A conv with a bias happens to work: Opacus then hooks the conv and its functorch fallback differentiates
   through the parametrization.)
2. With ``preserve=True`` every standardized conv holds the Adaptive WS buffers ``gain`` / ``shift``
   (wsconvert.ws.adaptive). Opacus refuses every trainable layer holding a buffer, twice: ``GradSampleHooks
   .validate`` (run by ``GradSampleModule(..., strict=True)``, the default, and so by ``make_private``) raises
   ``NotImplementedError: Model contains a trainable layer with buffers...`` for the ``ParametrizationList`` (and
   for a conv with a bias), and functorch's ``prepare_layer`` raises ``This layer has buffers and is not supported
   by Opacus``. Its functorch path could not use them anyway: it runs a ``meta`` copy of the layer through
   ``torch.func.functional_call`` with the parameters only.

Opacus forbids buffers because the ones it knows (BatchNorm's running statistics) are written from the batch, so
they mix samples and are not private. gain/shift are not: they are constants, set from the weights at conversion
or at ``load_state_dict`` and never written by a forward (W_eff = gain * WS(W) + shift; the gradient flows to W
only). ``enable_opacus()`` therefore

- makes Opacus treat every module carrying a WeightStandardization parametrization as one layer (hooked, its
  inputs recorded), as it already does for a conv with a bias;
- computes that layer's per-sample gradients with Opacus's own functorch recipe (``torch.func.vmap`` of
  ``torch.func.grad`` of ``sum(output * backprops)`` through ``functional_call`` of a ``meta`` copy of the layer),
  passing the layer's *current* buffers as unbatched constants next to the parameters, so the standardization and
  the gain/shift are differentiated per sample and a later ``load_state_dict`` or ``.to()`` is seen;
- exempts exactly the gain/shift of WeightStandardization modules from the buffer check: any other buffer of a
  trainable layer is still reported, with Opacus's message. A model without gain/shift gets Opacus's own check.

Modules without a WS parametrization are handled exactly as before.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from ..errors import WSConvertError
from ..ws.detect import has_standardization
from ..ws.standardize import WeightStandardization

__all__ = ["enable_opacus"]

_MARK = "_wsconvert_opacus"
_PER_SAMPLE = "_wsconvert_per_sample_grad"  # not Opacus's ft_compute_sample_grad: see _prepare_layer


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _constant_buffers(module: nn.Module) -> set[int]:
    """ids of the gain/shift buffers of every WeightStandardization in ``module`` (constants, see above)."""
    ids = set()
    for sub in module.modules():
        if isinstance(sub, WeightStandardization):
            ids.update(id(b) for key in ("gain", "shift") if (b := sub._buffers.get(key)) is not None)
    return ids


def _make_validate(original: Callable, trainable_modules: Callable) -> Callable:
    def validate(cls: type, module: nn.Module, *, strict: bool = False) -> list[NotImplementedError]:
        """Opacus's rule (no buffers in a trainable layer), with WeightStandardization gain/shift exempt."""
        constant = _constant_buffers(module)
        if not constant:
            return original(module, strict=strict)
        errors = [
            NotImplementedError(
                f"Model contains a trainable layer with buffers that Opacus doesn't currently support({name}:{m}). "
            )
            for name, m in trainable_modules(module)
            if any(id(b) not in constant for b in m.buffers())
        ]
        if strict and errors:
            raise NotImplementedError(errors)
        return errors

    return validate


def _prepare_layer(layer: nn.Module, batch_first: bool = True) -> None:
    """Opacus's functorch preparation (opacus/grad_sample/functorch.py ``prepare_layer``) for a module with a
    WS parametrization, taking the buffers as a second, unbatched argument.

    The function is stored under a name of wsconvert's own: an Opacus path that does not go through this
    module's ``ft_compute_per_sample_gradient`` (the ghost-clipping modes) then prepares the layer itself and
    reports the buffers, instead of calling a function with the wrong arguments.
    """
    from torch.func import functional_call, grad, vmap

    names = [name for name, _ in layer.named_parameters()]
    buffer_names = [name for name, _ in layer.named_buffers()]
    stateless = copy.deepcopy(layer).to("meta")  # every tensor is passed in: the copy only holds the structure
    dim = 0 if batch_first else 1

    def loss(params: tuple[Tensor, ...], buffers: tuple[Tensor, ...], activations: Tensor, backprops: Tensor) -> Tensor:
        state = dict(zip(names, params, strict=True)) | dict(zip(buffer_names, buffers, strict=True))
        mixed = activations.dtype != params[0].dtype
        with torch.amp.autocast(activations.device.type, dtype=activations.dtype) if mixed else nullcontext():
            output = functional_call(stateless, state, (activations.unsqueeze(dim),))
            return (output * backprops.unsqueeze(dim)).sum()

    object.__setattr__(layer, _PER_SAMPLE, vmap(grad(loss), in_dims=(None, None, 0, 0)))


def _per_sample_gradients(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[Tensor, Tensor]:
    """{parameter: per-sample gradient} of a layer with a WS parametrization (Opacus's
    ``ft_compute_per_sample_gradient``, with the layer's current buffers as constants)."""
    if not hasattr(layer, _PER_SAMPLE):
        _prepare_layer(layer)
    params = tuple(layer.parameters())
    buffers = tuple(layer.buffers())
    x = activations[0]
    if x.dtype != backprops.dtype and x.is_floating_point():
        x = x.to(backprops.dtype)
    grads = getattr(layer, _PER_SAMPLE)(params, buffers, x, backprops)
    return dict(zip(params, grads, strict=True))


def _patch(owner: object, name: str, make: Callable[[Callable], Callable], *, classmethod_: bool = False) -> None:
    """Replace ``owner.name`` by ``make(original)`` unless already done (each patch is idempotent on its own)."""
    current = getattr(owner, name)
    if getattr(current, _MARK, False):
        return
    original = current
    patched = make(original)
    setattr(patched, _MARK, True)
    patched.__wrapped__ = original
    setattr(owner, name, classmethod(patched) if classmethod_ else patched)


def enable_opacus() -> None:
    """Let Opacus compute per-sample gradients of converted models, ``preserve=True`` ones included (hooks and
    functorch grad-sample modes).

    Call it once, before ``GradSampleModule(model)`` or ``PrivacyEngine.make_private``; calling it again does
    nothing. It patches five names in ``opacus.grad_sample.grad_sample_module`` (the module walk
    ``GradSampleHooks.iterate_submodules``, the ``requires_grad`` check of the activation hook,
    ``GradSampleHooks.validate`` and the functorch pair ``prepare_layer`` / ``ft_compute_per_sample_gradient``)
    so that a module with a WS parametrization counts as one layer whose gain/shift buffers are constants.
    Raises WSConvertError if opacus is not installed or no longer has those names.
    """
    try:
        from opacus.grad_sample import grad_sample_module as gsm
    except ImportError as error:
        raise WSConvertError("enable_opacus() needs Opacus: pip install opacus") from error
    hooks = getattr(gsm, "GradSampleHooks", None)
    needed = ("requires_grad", "trainable_modules", "prepare_layer", "ft_compute_per_sample_gradient")
    missing = [f"GradSampleHooks.{n}" for n in ("iterate_submodules", "validate") if not hasattr(hooks, n)]
    missing += [n for n in needed if not hasattr(gsm, n)]
    if hooks is None or missing:
        raise WSConvertError(
            f"this Opacus version has no {', '.join(missing) or 'GradSampleHooks'} in "
            "opacus.grad_sample.grad_sample_module to extend (wsconvert supports Opacus 1.5-1.6); per-sample "
            "gradients of standardized convs would fail, so pin opacus<1.7"
        )

    def make_iterate(original: Callable) -> Callable:
        def iterate_submodules(self: object, module: nn.Module) -> Iterator[nn.Module]:
            if has_standardization(module) and _trainable(module):
                yield module  # one layer: never descend into its ParametrizationList
                return
            yield from original(self, module)

        return iterate_submodules

    def make_requires_grad(original: Callable) -> Callable:
        def requires_grad(module: nn.Module, *, recurse: bool = False) -> bool:
            return original(module, recurse=recurse or has_standardization(module))

        return requires_grad

    def make_prepare(original: Callable) -> Callable:
        def prepare_layer(layer: nn.Module, batch_first: bool = True) -> None:
            if has_standardization(layer):
                return _prepare_layer(layer, batch_first=batch_first)
            return original(layer, batch_first=batch_first)

        return prepare_layer

    def make_compute(original: Callable) -> Callable:
        def ft_compute_per_sample_gradient(layer: nn.Module, activations: list, backprops: Tensor) -> dict:
            if has_standardization(layer):
                return _per_sample_gradients(layer, activations, backprops)
            return original(layer, activations, backprops)

        return ft_compute_per_sample_gradient

    _patch(hooks, "iterate_submodules", make_iterate)
    _patch(gsm, "requires_grad", make_requires_grad)
    _patch(gsm, "prepare_layer", make_prepare)
    _patch(gsm, "ft_compute_per_sample_gradient", make_compute)
    _patch(
        hooks,
        "validate",
        lambda original: _make_validate(original, gsm.trainable_modules),
        classmethod_=True,
    )
