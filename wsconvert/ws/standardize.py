"""The Weight Standardization math and the parametrization module that applies it.

Weight Standardization (Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization", arXiv:1903.10520, eq. 5): every output filter W[i] of a convolution, seen as
the vector of its I = in_channels/groups * prod(kernel) elements, is replaced by

    W_hat[i] = (W[i] - mean(W[i])) / sigma(W[i])

and the loss is optimized with respect to W. Two variants exist in public code:

- ``"standard"``: biased variance, eps inside the square root, ``(W - mean) / sqrt(var + eps)``. This is
  timm's StdConv2d (timm/layers/std_conv.py), BiT and Composer. Computed with a single fused
  ``F.layer_norm`` over each filter, which has a finite gradient even for a constant filter.
- ``"paper"``: the authors' reference Conv2d (joe-siyuan-qiao/pytorch-classification, models/layers.py):
  unbiased standard deviation with eps added to it, ``(W - mean) / (std + eps)``. The forward pass
  matches that code; unlike it, the gradient stays finite when a filter's variance is exactly zero.

Half and bfloat16 weights are standardized in float32 and cast back, since eps values of 1e-8..1e-10
underflow in fp16 (lucidrains/denoising-diffusion-pytorch #233).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .._validate import validate_eps, validate_style
from ..errors import InvalidOptionError, UnsupportedModuleError, WSConvertError
from .fsdp import fsdp2_in_use

__all__ = [
    "STYLES",
    "WeightStandardization",
    "apply_filter_affine",
    "standardize_weight",
    "validate_eps",
    "validate_style",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _standard(rows: Tensor, eps: float) -> Tensor:
    """(W - mean) / sqrt(var_biased + eps) per row, as timm StdConv2d computes it."""
    return F.layer_norm(rows, (rows.shape[1],), eps=eps)


def _paper(rows: Tensor, eps: float) -> Tensor:
    """(W - mean) / (std_unbiased + eps) per row, as the authors' reference Conv2d computes it."""
    var, mean = torch.var_mean(rows, dim=1, correction=1, keepdim=True)
    positive = var > 0
    # sqrt has an infinite derivative at 0; route zero variances around it (forward value unchanged).
    std = torch.where(positive, torch.where(positive, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))
    return (rows - mean) / (std + eps)


STYLES: dict[str, Callable[[Tensor, float], Tensor]] = {"standard": _standard, "paper": _paper}


def _filters_as_rows(weight: Tensor, transposed: bool, groups: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """View ``weight`` as (out_channels, fan_in) rows, and return the function that undoes it.

    Plain conv weights are (out, in/groups, *kernel). The row is taken in memory order (a view, no copy,
    for contiguous and channels_last weights alike: the statistics do not depend on element order), and
    the result keeps the weight's memory format. ConvTranspose weights are (in, out/groups, *kernel):
    their output channel is dim 1 within each group, so they are regrouped (a copy).
    """
    shape = weight.shape
    if transposed:
        in_channels, out_per_group = shape[0], shape[1]
        in_per_group = in_channels // groups
        grouped = weight.reshape(groups, in_per_group, out_per_group, -1).transpose(1, 2)
        rows = grouped.reshape(groups * out_per_group, -1)

        def restore_transposed(out: Tensor) -> Tensor:
            return out.reshape(groups, out_per_group, in_per_group, -1).transpose(1, 2).reshape(shape)

        return rows, restore_transposed

    inner = sorted(range(1, weight.dim()), key=lambda d: -weight.stride(d))
    order = [0, *inner]
    permuted = weight.permute(order)
    if not permuted.is_contiguous():
        permuted = permuted.contiguous()
    inverse = [order.index(d) for d in range(weight.dim())]

    def restore(out: Tensor) -> Tensor:
        return out.view(permuted.shape).permute(inverse)

    return permuted.view(shape[0], -1), restore


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _standard_direct(weight: Tensor, eps: float) -> Tensor | None:
    """The "standard" style as ONE ``F.layer_norm`` over all dims but the first, or None if the layout forbids.

    Taken for plain (not transposed) weights that are contiguous or channels_last: each filter is then one
    contiguous run of memory, so there is no view, copy or permute to record for autograd (a channels_last
    weight is permuted to its memory order and back: two free views) and the result keeps the weight's
    layout. This is the training hot path: one fused kernel forward, one backward.
    """
    if weight.dtype in _LOW_PRECISION:
        out = _standard_direct(weight.float(), eps)
        return None if out is None else out.to(weight.dtype)
    if weight.is_contiguous():
        return F.layer_norm(weight, weight.shape[1:], eps=eps)
    memory_format = _CHANNELS_LAST.get(weight.dim())
    if memory_format is not None and weight.is_contiguous(memory_format=memory_format):
        last = weight.dim() - 1
        channels_inner = weight.permute(0, *range(2, last + 1), 1)
        return F.layer_norm(channels_inner, channels_inner.shape[1:], eps=eps).permute(0, last, *range(1, last))
    return None


def _standard_compiled(weight: Tensor, eps: float) -> Tensor:
    """The "standard" style as traced under torch.compile: ``(W - mean) * rsqrt(var_biased + eps)``.

    Same formula as ``_standard_direct``, written as var_mean + elementwise ops that inductor fuses with its
    own generated kernels, forward and backward; a traced ``layer_norm`` compiled to a slower training step
    (ResNet-18, batch 16, 64x64, CPU: 1.21x plain vs 1.14x, docs/benchmarks.md). Works for any layout.
    """
    w = weight.float() if weight.dtype in _LOW_PRECISION else weight
    var, mean = torch.var_mean(w, dim=tuple(range(1, w.dim())), keepdim=True, correction=0)
    return ((w - mean) * torch.rsqrt(var + eps)).to(weight.dtype)


def standardize_weight(
    weight: Tensor,
    eps: float = 1e-5,
    style: str = "standard",
    *,
    transposed: bool = False,
    groups: int = 1,
) -> Tensor:
    """Return the weight-standardized copy of a conv weight, per output channel (arXiv:1903.10520 eq. 5)."""
    if style == "standard" and not transposed:
        if torch.compiler.is_compiling():
            return _standard_compiled(weight, eps)
        out = _standard_direct(weight, eps)
        if out is not None:
            return out
    rows, restore = _filters_as_rows(weight, transposed, groups)
    if rows.dtype in _LOW_PRECISION:
        return restore(STYLES[style](rows.float(), eps).to(weight.dtype))
    return restore(STYLES[style](rows, eps))


def standardize_weight_keeping_stats(
    weight: Tensor, eps: float, style: str, *, transposed: bool = False, groups: int = 1
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """``standardize_weight``, plus each filter's (mean, 1/sqrt(var + eps)) where the fast path computes them.

    The statistics come from the same ``native_layer_norm`` call that produces W_hat (contiguous float32
    weights, "standard" style, eager), so ``(W - mean) * rstd`` rebuilds W_hat in one elementwise pass
    (wsconvert.ws.recompute). Elsewhere the second element is None and W_hat is rebuilt from scratch.
    """
    if (
        style == "standard"
        and not transposed
        and weight.dtype == torch.float32
        and weight.is_contiguous()
        and not torch.compiler.is_compiling()
    ):
        out, mean, rstd = torch.native_layer_norm(weight, weight.shape[1:], None, None, eps)
        return out, (mean.detach(), rstd.detach())
    return standardize_weight(weight, eps, style, transposed=transposed, groups=groups), None


def apply_filter_affine(
    w_hat: Tensor, gain: Tensor, shift: Tensor, *, transposed: bool = False, groups: int = 1
) -> Tensor:
    """``gain[o] * w_hat[filter o] + shift[o]`` for every output channel o; gain/shift have shape (out_channels,).

    Plain conv weights are (out, in/groups, *kernel); ConvTranspose weights (in, out/groups, *kernel), whose
    output channel g * out/groups + j is column j of group g. Low-precision weights are combined in float32.
    """
    dtype = w_hat.dtype
    if dtype in _LOW_PRECISION:
        w_hat, gain, shift = w_hat.float(), gain.float(), shift.float()
    ones = (1,) * (w_hat.dim() - 2)
    if transposed:
        shape = w_hat.shape
        grouped = w_hat.reshape(groups, shape[0] // groups, shape[1], *shape[2:])
        out = torch.addcmul(shift.view(groups, 1, -1, *ones), grouped, gain.view(groups, 1, -1, *ones))
        out = out.reshape(shape)
    else:
        out = torch.addcmul(shift.view(-1, 1, *ones), w_hat, gain.view(-1, 1, *ones))
    return out.to(dtype)


class WeightStandardization(nn.Module):
    """Parametrization W -> W_hat for ``torch.nn.utils.parametrize.register_parametrization``.

    ``transposed`` and ``groups`` describe the weight layout: pass ``transposed=True`` and the conv's
    ``groups`` for ConvTranspose weights (``WeightStandardization.for_conv`` reads them from the module).

    When W cannot receive a gradient through this call (under ``torch.no_grad`` / inference mode, or a
    frozen W), W_hat is cached (always as a normal tensor) and reused until a read sees a different key: W's
    storage address, version counter and dtype, the cached W_hat's own version counter (an in-place edit of the
    tensor ``conv.weight`` returned is a miss), and the optimizer-step generation, bumped before and after
    every ``torch.optim.Optimizer.step()`` (fused kernels do not bump W's version). ``.to()`` / ``.half()`` /
    ``.cuda()``, every forward that records gradients, every ``train()`` / ``eval()`` call, ``clear_cache()``
    and ``conv.weight = X`` clear it. Not seen: edits through ``.data`` or ``.numpy()`` (no version bump) and
    writes by code that is neither an Optimizer step nor version-bumping (functional fused optimizers, CUDA
    graph replays): call ``invalidate_all_caches()`` or ``clear_cache()`` after those; ``cache=False`` turns
    caching off. A W that is an inference tensor is never cached. Full contract: docs/api.md.

    Optional buffers ``gain`` / ``shift`` (shape (out_channels,), set by ``set_affine``, see wsconvert.preserve)
    make the result W_eff = gain * W_hat + shift per output filter (Adaptive WS, DetectoRS arXiv:2006.02334).
    The cache then holds W_eff and its key also covers their address and version.
    """

    def __init__(
        self,
        eps: float = 1e-5,
        style: str = "standard",
        *,
        transposed: bool = False,
        groups: int = 1,
        cache: bool = True,
    ) -> None:
        super().__init__()
        self.eps = validate_eps(eps)
        self.style = validate_style(style)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise InvalidOptionError(f"groups={groups!r} must be an integer >= 1 (the conv's groups)")
        self.transposed = bool(transposed)
        self.groups = groups
        self.cache = bool(cache)
        self._cached: tuple[tuple, Tensor, Tensor, tuple | None] | None = None
        # Adaptive WS (wsconvert.preserve): optional per-output-filter buffers, W_eff = gain * W_hat + shift.
        # None (absent from the state dict) unless set_affine() gave them values.
        self.register_buffer("gain", None)
        self.register_buffer("shift", None)
        # Set by wsconvert.ws.recompute around a conv forward: remember the W_hat handed to the conv and the
        # statistics that rebuild it.
        self._record = False
        self._recorded: tuple[Tensor, tuple[Tensor, Tensor] | None] | None = None

    @classmethod
    def for_conv(cls, conv: nn.Module, eps: float = 1e-5, style: str = "standard") -> WeightStandardization:
        """The parametrization matching ``conv``'s weight layout (transposed or not, its groups)."""
        return cls(eps, style, transposed=bool(getattr(conv, "transposed", False)), groups=int(conv.groups))

    def forward(self, weight: Tensor) -> Tensor:
        if _in_graph_capture():
            # A compiled or traced graph computes W_hat itself. Not even reading the cache here: torch.compile
            # would guard on it and recompile whenever eager code refills it.
            return self.adapt(
                standardize_weight(weight, self.eps, self.style, transposed=self.transposed, groups=self.groups)
            )
        if not self.cache or _must_recompute(weight):
            if self._cached is not None:
                self._cached = None
            if self._record:
                w_hat, stats = standardize_weight_keeping_stats(
                    weight, self.eps, self.style, transposed=self.transposed, groups=self.groups
                )
                self._recorded = (self.adapt(w_hat), stats)
                return self._recorded[0]
            return self.adapt(
                standardize_weight(weight, self.eps, self.style, transposed=self.transposed, groups=self.groups)
            )
        cached = self.cached_result(weight)
        if cached is not None:
            return cached
        if _inference_mode() and not weight.is_inference():
            # Fill with a normal tensor: it serves later no_grad reads too, and in-place edits of it bump a
            # version counter the key checks (inference tensors have none).
            with torch.inference_mode(False), torch.no_grad():
                return self.forward(weight)
        result = self.adapt(
            standardize_weight(weight, self.eps, self.style, transposed=self.transposed, groups=self.groups)
        )
        if weight.is_inference():
            # W was made under inference mode: it has no version counter, so an in-place edit of it inside
            # inference mode could not be seen. Never cached.
            self._cached = None
            return result
        # Holding an alias of W keeps its storage alive, so its address cannot be reused by another tensor
        # (the same holds for gain/shift, aliased in their key).
        self._cached = (_cache_key(weight, result), weight.detach(), result, self._affine_key())
        return result

    def cached_result(self, weight: Tensor) -> Tensor | None:
        """The cached W_hat if it is valid for ``weight`` right now, else None: the one cache-hit rule, used by
        ``forward`` and by wsconvert.ws.cached_weight's short read path. Read-only: never fills, clears or computes.
        """
        # The checks of forward's cached branch, inlined: this runs once per conv per eval forward.
        if _is_compiling() or _is_tracing():  # first: dynamo must not guard on the cache
            return None
        cached = self._cached
        if (
            cached is None
            or not self.cache
            or (weight.requires_grad and _grad_enabled())
            or fsdp2_in_use()
            or cached[0] != _cache_key(weight, cached[2])
            or (cached[3] is not None and cached[3] != self._affine_key())
        ):
            return None
        return cached[2]

    def _affine_key(self) -> tuple | None:
        """What identifies gain/shift's current values (address, version), None without them."""
        gain, shift = self._buffers.get("gain"), self._buffers.get("shift")
        if gain is None or shift is None:
            return None
        return (gain.data_ptr(), gain._version, shift.data_ptr(), shift._version, gain.dtype)

    def adapt(self, w_hat: Tensor) -> Tensor:
        """W_eff = gain * W_hat + shift per output filter when gain/shift are set (Adaptive WS, DetectoRS,
        arXiv:2006.02334; mmcv ConvAWS2d), else ``w_hat`` itself. See wsconvert.preserve."""
        gain, shift = self._buffers.get("gain"), self._buffers.get("shift")
        if gain is None or shift is None:
            return w_hat
        return apply_filter_affine(w_hat, gain, shift, transposed=self.transposed, groups=self.groups)

    def set_affine(self, gain: Tensor | None, shift: Tensor | None) -> None:
        """Set (or, with None, remove) the per-output-filter gain/shift buffers, shape (out_channels,)."""
        if (gain is None) != (shift is None):
            raise InvalidOptionError("gain and shift are set together: pass both tensors, or both None")
        self._buffers["gain"] = None if gain is None else gain.detach()
        self._buffers["shift"] = None if shift is None else shift.detach()
        self._cached = None

    def clear_cache(self) -> None:
        """Drop this parametrization's cached W_hat (e.g. after editing W through ``W.data``)."""
        self._cached = None

    @staticmethod
    def invalidate_all_caches() -> None:
        """Invalidate the cached W_hat of every WeightStandardization in the process, in O(1).

        For updates that neither bump W's version counter nor run a ``torch.optim.Optimizer`` step: ``.data``
        edits, optimizers that are not ``torch.optim.Optimizer`` subclasses and write W with fused kernels,
        replays of a captured CUDA graph. Each cache is refilled at its next no_grad read.
        """
        _new_generation()

    def right_inverse(self, value: Tensor) -> Tensor:
        """``conv.weight = X`` makes X the trained weight W itself (identity), as ``load_state_dict`` of a plain
        checkpoint does; reading ``conv.weight`` afterwards gives WS(X), not X.

        W stays the same Parameter (optimizers keep tracking it). convert_model's property setter
        (wsconvert.ws.cached_weight) first checks X against W's shape, dtype and device, then copies X into W; on a
        parametrization registered by hand, parametrize ``set_``s W onto X's data instead. Clears the cache.
        """
        if not isinstance(value, Tensor):
            raise WSConvertError(
                f"cannot assign a {type(value).__name__} to a weight-standardized conv weight: assign a tensor "
                "shaped like the conv's weight (it becomes the trained weight W; reading conv.weight gives WS(W))"
            )
        self._cached = None
        return value

    def __prepare_scriptable__(self) -> WeightStandardization:
        """Refuse ``torch.jit.script``, which calls this on every submodule (torch/jit/_script.py).

        TorchScript cannot compile parametrize's machinery; without this the user gets an unrelated
        NotSupportedError about variadic arguments. ``torch.jit.trace`` and ``torch.export`` do work.
        """
        raise UnsupportedModuleError(
            "torch.jit.script cannot compile a weight-standardized model (torch.nn.utils.parametrize is not "
            "scriptable); call wsconvert.bake(model) first and script the baked model, which computes the same "
            "outputs with plain conv weights (for inference and export, not further WS training)"
        )

    def train(self, mode: bool = True) -> WeightStandardization:
        # A train()/eval() switch starts a new phase: W may have been rewritten in ways the key cannot see.
        self._cached = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's own signature
        self._cached = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_cached"] = None
        state["_record"], state["_recorded"] = False, None
        return state

    def extra_repr(self) -> str:
        layout = f", transposed=True, groups={self.groups}" if self.transposed else ""
        adaptive = ", gain/shift (Adaptive WS)" if self._buffers.get("gain") is not None else ""
        return f"eps={self.eps}, style={self.style!r}{layout}{adaptive}"


_is_compiling = torch.compiler.is_compiling  # bound once: these run on every cached weight read
_is_tracing = torch._C._is_tracing
_grad_enabled = torch.is_grad_enabled
_inference_mode = torch.is_inference_mode_enabled


# The optimizer-step generation: part of every cache key, bumped before and after each torch.optim.Optimizer
# step (global step hooks, registered below). Fused optimizer kernels (fused=True in SGD, Adam, AdamW, Adagrad)
# and compiled steps write W without bumping its version counter; a new generation invalidates every cache.
_generation = 0


def _new_generation(*_hook_args: object) -> None:
    global _generation
    _generation += 1


register_optimizer_step_pre_hook(_new_generation)  # also covers a step that fails halfway
register_optimizer_step_post_hook(_new_generation)  # also covers closures (LBFGS) that read W during the step


def _cache_key(weight: Tensor, result: Tensor) -> tuple:
    """What identifies a cached W_hat as current: W's address (data_ptr), version counter (bumped by in-place
    edits, ``load_state_dict``, foreach and for-loop optimizer steps) and dtype, the version counter of the
    cached W_hat itself (bumped when someone edits the tensor ``conv.weight`` returned), and the optimizer-step
    generation (fused steps). Plain Python ints and a dtype: no device sync. Device, shape and stride moves go
    through ``_apply`` (which clears the cache) or give W new memory; the cache holds an alias of W, so its
    address cannot be reused meanwhile. An inference tensor W has no version counter: it gets None, which never
    matches (such a W is never cached)."""
    try:
        version = weight._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        version = None
    return (weight.data_ptr(), version, weight.dtype, result._version, _generation)


def _in_graph_capture() -> bool:
    """True while torch.compile / torch.export or torch.jit.trace is recording a graph.

    ``torch._C._is_tracing`` is what ``torch.jit.is_tracing`` returns outside TorchScript (which cannot
    compile parametrize anyway), without its Python layer: this runs on every cached weight read."""
    return _is_compiling() or _is_tracing()


def _must_recompute(weight: Tensor) -> bool:
    """True when the result must be built fresh: gradients flow to W, a compiler/tracer is recording, or FSDP2
    is in use (its all-gathers rewrite W without a version bump; see wsconvert.ws.fsdp)."""
    return (weight.requires_grad and torch.is_grad_enabled()) or _in_graph_capture() or fsdp2_in_use()
