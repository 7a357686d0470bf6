"""Convolutions: whether a conv's weight can take Weight Standardization (arXiv:1903.10520), and registering it.

``decide_conv`` / ``standardize_conv`` are what the built-in convolution rule and ``wsconvert.rules.standardize``
use: the weight gets a :class:`~wsconvert.ws.standardize.WeightStandardization` parametrization in place.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from ..errors import UnsupportedModuleError
from ..options import ConversionOptions
from ..ws import cached_weight, compat
from ..ws.detect import standardization
from ..ws.standardize import WeightStandardization
from .base import Decision, type_name

__all__ = ["FROZEN_REASON", "decide_conv", "require_initialized", "skip", "standardize_conv"]

# A weight that does not train cannot adapt to WS: a fixed operator (ultralytics' DFL conv, a constant
# arange(16) kernel with requires_grad=False: ultralytics/nn/modules/block.py) would compute something else, and a
# frozen pretrained layer would stay broken. Issue 13, point 4.
FROZEN_REASON = (
    "frozen weight (requires_grad=False): it cannot adapt to WS in training, and a fixed kernel (e.g. ultralytics' "
    "DFL arange conv) would compute something else; pass standardize_frozen=True (--standardize-frozen) to "
    "standardize it anyway (needed when a whole model was frozen, e.g. saved for inference)"
)


def skip(reason: str) -> Decision:
    """A "skip" decision with ``reason`` (what the report lists)."""
    return Decision("skip", reason=reason)


def require_initialized(module: nn.Module, path: str) -> None:
    """Raise for a lazy module whose parameters do not exist yet (nothing to standardize or carry over)."""
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise UnsupportedModuleError(
            f"{path or '<model>'} ({type(module).__name__}) is a lazy module whose parameters are not "
            "initialized yet; run one forward pass with a sample input first, then convert"
        )


def decide_conv(conv: nn.Module, path: str, options: ConversionOptions) -> Decision:
    """Standardize ``conv`` in place, or skip it with the reason WS would be wrong or impossible.

    A frozen weight (``requires_grad=False``) is skipped unless ``options.standardize_frozen``.
    """
    require_initialized(conv, path)
    if standardization(conv) is not None:
        return skip("already weight-standardized (wsconvert)")
    if parametrize.is_parametrized(conv, "weight"):
        names = ", ".join(type(p).__name__ for p in conv.parametrizations["weight"])
        return skip(
            f"weight already carries a parametrization ({names}); WS on top would cancel its scaling. "
            "Remove it first to standardize this conv"
        )
    weight = conv._parameters.get("weight")
    if weight is None:
        return skip(
            "weight is not a parameter of this module (it is computed by a hook, e.g. the deprecated "
            "torch.nn.utils.weight_norm/spectral_norm); remove that hook first"
        )
    if not weight.requires_grad and not options.standardize_frozen:
        return skip(FROZEN_REASON)
    if weight.numel() // conv.out_channels == 1:
        return skip("fan-in 1: standardizing a one-element filter would turn it to zeros")
    if options.skip_depthwise and conv.groups == conv.in_channels > 1:
        return skip("depthwise conv (skip_depthwise=True)")
    return Decision("standardize", becomes=f"{type_name(conv)}+WS")


def standardize_conv(conv: nn.Module, decision: Decision, options: ConversionOptions) -> nn.Module:
    """Register WS on ``conv.weight`` (with the eval-mode cache and plain-weight state dict loading)."""
    ws = WeightStandardization.for_conv(conv, options.eps, options.style)
    # unsafe=True skips parametrize's trial evaluation: WS never changes shape or dtype.
    parametrize.register_parametrization(conv, "weight", ws, unsafe=True)
    cached_weight.install(conv)
    compat.accept_plain_weight(conv)
    return conv
