"""Opt-in: recompute W_hat in backward instead of keeping it alive from forward to backward.

A convolution saves its weight for the backward pass (grad_input = conv_transpose(grad_output, weight)). For a
plain conv that weight is the parameter itself, which exists anyway; for a weight-standardized conv it is
W_hat, a second copy of every conv weight that lives from each conv's forward until its backward. That is the
whole memory cost of WS in fp32 training: about 1.10x plain peak memory for ResNet-50 (batch 8, 128x128) and
1.14x for ResNet-18 (batch 16, 64x64) on CPU, the same as timm's StdConv2d (docs/benchmarks.md).

``recompute_in_backward(model)`` trades that memory for time: while a standardized conv runs its forward with
gradients recorded, a ``torch.autograd.graph.saved_tensors_hooks`` pair is active (entered by a forward
pre-hook, left by an always-called forward hook). Its pack hook replaces W_hat, recognised by identity, with a
small recipe (the parameter W, its version, and the per-filter mean and 1/std of the forward); the unpack hook
rebuilds W_hat as ``(W - mean) * rstd`` in one elementwise pass when the conv's backward needs it. Every other
saved tensor passes through untouched. In a grad-enabled backward (``create_graph=True``, double backward)
W_hat is recomputed from W with autograd instead, so second-order terms keep the path from W_hat to W.

Where the mode steps aside (W_hat is then saved as usual, results are identical):
- under torch.compile / torch.export / jit.trace (the compiler plans its own recomputation),
- when other saved-tensor hooks are active or disabled (non-reentrant activation checkpointing, CPU offload
  of activations, torch.func transforms): nesting would override theirs,
- under FSDP2 (its unsharded parameters are freed between forward and backward; not validated here),
- under autocast: the conv saves the low-precision copy of W_hat, not W_hat, and plain convs save the same
  copy of W, so there is no extra memory to win (measured 1.000x), only the hooks' cost.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from ..errors import WSConvertError
from .detect import standardization
from .fsdp import fsdp2_in_use
from .standardize import WeightStandardization, standardize_weight

__all__ = ["recompute_in_backward", "recomputes_in_backward"]

_autograd = torch._C._autograd


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one query per device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _other_saved_tensor_hooks_active() -> bool:
    """True when entering our hooks would override or break someone else's (private probes, guarded)."""
    enabled = getattr(_autograd, "_saved_tensors_hooks_is_enabled", None)
    if enabled is not None and not enabled():
        return True
    top = getattr(_autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


class _Recipe:
    """What autograd keeps instead of W_hat: W itself (a parameter, kept anyway) and per-filter statistics."""

    __slots__ = ("ws", "weight", "version", "stats")

    def __init__(self, ws: WeightStandardization, weight: Tensor, stats: tuple[Tensor, Tensor] | None) -> None:
        self.ws, self.weight, self.version, self.stats = ws, weight, weight._version, stats

    def rebuild(self) -> Tensor:
        if self.weight._version != self.version:
            raise WSConvertError(
                f"the weight {tuple(self.weight.shape)} of a standardized conv was modified in place between "
                "forward and backward (e.g. an optimizer step before loss.backward()), so W_hat cannot be "
                "recomputed for this backward; run backward first, or turn recompute_in_backward off"
            )
        # ws.adapt applies the Adaptive WS gain/shift when the conv has them (wsconvert.preserve): the conv saw W_eff.
        if self.stats is not None and not torch.is_grad_enabled():
            mean, rstd = self.stats  # one elementwise pass; bitwise what native_layer_norm computed on CPU
            return self.ws.adapt(torch.sub(self.weight.detach(), mean).mul_(rstd))
        # From scratch; also for double backward (create_graph=True), where W_hat must stay a function of W.
        ws = self.ws
        return ws.adapt(standardize_weight(self.weight, ws.eps, ws.style, transposed=ws.transposed, groups=ws.groups))


class _RecomputeHooks:
    """The forward pre-hook and always-called forward hook of one standardized conv.

    The hooks context entered in ``before`` is left in ``after``; it is kept per thread, since DataParallel
    replicas run the same hook objects in several threads.
    """

    def __init__(self) -> None:
        self.active: dict[int, list[tuple[object, WeightStandardization | None]]] = {}

    def __deepcopy__(self, memo: dict) -> _RecomputeHooks:
        return _RecomputeHooks()

    def _stack(self) -> list[tuple[object, WeightStandardization | None]]:
        return self.active.setdefault(threading.get_ident(), [])

    def before(self, conv: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():  # first: nothing below should be traced into a graph
            return
        stack = self._stack()
        ws = standardization(conv, alone=True)
        weight = conv.parametrizations.weight.original if ws is not None else None
        if (
            weight is None
            or not torch.is_grad_enabled()
            or not weight.requires_grad
            or torch.jit.is_tracing()
            or _autocast_enabled(weight.device.type)
            or fsdp2_in_use()
            or _other_saved_tensor_hooks_active()
        ):
            stack.append((None, None))
            return

        # ws._recorded is shared by threads running the same conv: if another thread overwrote it, this conv's
        # W_hat is simply not recognised and saved as usual (less memory saved, never a wrong tensor).
        def pack(tensor: Tensor) -> object:
            recorded = ws._recorded
            if recorded is not None and tensor is recorded[0]:
                return _Recipe(ws, weight, recorded[1])
            return tensor

        def unpack(saved: object) -> Tensor:
            return saved.rebuild() if isinstance(saved, _Recipe) else saved

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        hooks.__enter__()
        ws._record = True
        stack.append((hooks, ws))

    def after(self, conv: nn.Module, args: tuple, output: object) -> None:
        if torch.compiler.is_compiling():
            return
        stack = self._stack()
        if not stack:
            return
        hooks, ws = stack.pop()
        if hooks is None or ws is None:
            return
        ws._record = False
        ws._recorded = None
        hooks.__exit__(None, None, None)


def _installed(conv: nn.Module) -> list[tuple[int, _RecomputeHooks]]:
    return [
        (key, hook.__self__)
        for key, hook in list(conv._forward_pre_hooks.items())
        if isinstance(getattr(hook, "__self__", None), _RecomputeHooks)
    ]


def recomputes_in_backward(conv: nn.Module) -> bool:
    """Whether ``recompute_in_backward`` is on for this conv."""
    return bool(_installed(conv))


def recompute_in_backward(model: nn.Module, enabled: bool = True) -> int:
    """Recompute W_hat during backward instead of saving it, for every standardized conv of ``model``.

    Peak training memory drops to about that of plain convs (fp32); each training step computes W_hat once
    more per conv (measured in docs/benchmarks.md). Outputs and gradients are unchanged. ``enabled=False``
    removes the hooks again. Returns the number of convs switched. Call it on the bare model, before wrapping
    it (DDP, torch.compile): the hooks live on the convs.
    """
    if not isinstance(enabled, bool):
        raise WSConvertError(f"enabled={enabled!r} must be True or False")
    switched = 0
    for conv in model.modules():
        if standardization(conv, alone=True) is None:
            continue
        present = _installed(conv)
        if enabled and not present:
            hooks = _RecomputeHooks()
            conv.register_forward_pre_hook(hooks.before)
            conv.register_forward_hook(hooks.after, always_call=True)
            switched += 1
        elif not enabled and present:
            for key, hooks in present:
                del conv._forward_pre_hooks[key]
                for post_key, post in list(conv._forward_hooks.items()):
                    if getattr(post, "__self__", None) is hooks:
                        del conv._forward_hooks[post_key]
                        conv._forward_hooks_always_called.pop(post_key, None)
            switched += 1
    return switched
