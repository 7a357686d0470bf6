"""The built-in rules table: which module types wsconvert converts, what each becomes, how its state is carried.

The walker (walk.py) knows no layer type. For every module it asks the rules ``wsconvert.rules.resolve``
gives, in order (a call's ``rules=``, then globally registered rules, then ``RULES``); the first whose
``matches`` is true ``decide``s (standardize in place, replace, or skip with a reason), and ``apply`` carries
that decision out. The table is written with the public helpers of helpers.py, the same a user's rule uses.

Types from optional packages (timm, torchvision, transformers, mmcv) are named by their dotted class names
and matched against a module's MRO: wsconvert never imports those packages.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from ..norms import bcn
from ..options import ConversionOptions
from .base import Decision, Rule, choose_groups, dotted_name, matches_types, type_name
from .conv import skip
from .helpers import already_standardized, keep, replace_norm, standardize
from .norm import group_norm, inherits_batchnorm_forward

__all__ = ["Decision", "Rule", "RULES", "choose_groups", "type_name"]  # and is_standardized (see __getattr__)

TIMM_STANDARDIZED_CONVS = tuple(
    f"timm.layers.std_conv.{name}" for name in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")
)
# huggingface/transformers src/transformers/models/bit/modeling_bit.py (also the backbone of ViT-hybrid and
# DPT-hybrid): F.batch_norm over each filter in forward.
HF_BIT_CONV = "transformers.models.bit.modeling_bit.WeightStandardizedConv2d"
# open-mmlab/mmcv mmcv/cnn/bricks/conv_ws.py: conv_ws_2d in forward; ConvAWS2d adds a per-channel gamma/beta.
MMCV_STANDARDIZED_CONVS = ("mmcv.cnn.bricks.conv_ws.ConvWS2d", "mmcv.cnn.bricks.conv_ws.ConvAWS2d")
TIMM_NORM_ACT = tuple(
    f"timm.layers.norm_act.{name}" for name in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
)
TORCHVISION_FROZEN_BATCHNORM = "torchvision.ops.misc.FrozenBatchNorm2d"
# huggingface/pytorch-image-models timm/layers/cond_conv2d.py: weight is (num_experts, out * in/groups * k * k).
TIMM_COND_CONV = ("timm.layers.cond_conv2d.CondConv2d", "timm.models.layers.cond_conv2d.CondConv2d")

_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")
# transformers src/transformers/models/detr/modeling_detr.py: DetrFrozenBatchNorm2d (and its copies in the other
# DETR-family models) has no eps attribute; its forward adds epsilon = 1e-5.
_DETR_FROZEN_EPS = 1e-5


def _overrides_forward(module: nn.Module) -> bool:
    """True when the class defining ``module``'s forward is not one of torch's own."""
    cls = parametrize.type_before_parametrizations(module)
    owner = next((c for c in cls.__mro__ if "forward" in vars(c)), nn.Module)
    return not owner.__module__.startswith("torch.")


def _is_named_weight_standardized_conv(module: nn.Module) -> bool:
    """lucidrains' denoising-diffusion-pytorch style: a conv subclass named WeightStandardizedConv2d whose own
    forward standardizes ``self.weight`` (e.g. ``(weight - mean) * (var + eps).rsqrt()``)."""
    return (
        isinstance(module, _ConvNd) and type_name(module) == "WeightStandardizedConv2d" and _overrides_forward(module)
    )


def is_frozen_batchnorm_like(module: nn.Module) -> bool:
    """A DETR-family frozen BatchNorm (transformers ``DetrFrozenBatchNorm2d``, ``ConditionalDetrFrozenBatchNorm2d``,
    ...): named ``*FrozenBatchNorm2d``, the four BatchNorm buffers, no ``num_features``, not a torch BatchNorm."""
    return (
        type_name(module).endswith("FrozenBatchNorm2d")
        and not isinstance(module, _BatchNorm)
        and not hasattr(module, "num_features")
        and all(isinstance(module._buffers.get(name), torch.Tensor) for name in _FROZEN_BUFFERS)
    )


# Norm layers wsconvert keeps on purpose (they normalize each sample already): not "unrecognized" below.
_KEPT_NORMS: tuple[type, ...] = (nn.GroupNorm, nn.LayerNorm, _InstanceNorm, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
_NORM_LIKE_NAME = re.compile(r"(BatchNorm|Norm[123]d)$")


def _has_tensor(module: nn.Module, name: str) -> bool:
    return isinstance(module._parameters.get(name), torch.Tensor) or isinstance(module._buffers.get(name), torch.Tensor)


def _norm_like_evidence(module: nn.Module) -> str:
    """Why ``module`` looks like a normalization layer ("" when it does not): the BatchNorm statistics buffers
    ``running_mean`` and ``running_var``, or a class name ending in BatchNorm / Norm1d/2d/3d with a ``weight`` and
    ``bias``. Norm layers kept on purpose (GroupNorm, LayerNorm, InstanceNorm, RMSNorm and their subclasses) and
    types declared with ``wsconvert.rules.declare_norm`` do not count."""
    from .kinds import declared  # kinds imports the registry, which imports this table

    if isinstance(module, _KEPT_NORMS) or matches_types(module, declared("norm")):
        return ""
    if all(isinstance(module._buffers.get(name), torch.Tensor) for name in ("running_mean", "running_var")):
        return "buffers running_mean and running_var"
    if _NORM_LIKE_NAME.search(type_name(module)) and _has_tensor(module, "weight") and _has_tensor(module, "bias"):
        return f"class name {type_name(module)!r} with a weight and a bias"
    return ""


def _decide_unrecognized_norm(module: nn.Module, path: str, options: ConversionOptions) -> Decision:
    cls = parametrize.type_before_parametrizations(module)
    return skip(
        f"looks like a normalization layer ({_norm_like_evidence(module)}) but no wsconvert rule matches "
        f"{cls.__name__}, so it is kept as it is and the unnormalized-conv probe does not count it as a norm "
        f"layer; if it is BatchNorm-like, register a rule for it: wsconvert.rules.register(wsconvert.rules"
        f".replace_norm({dotted_name(cls)!r})); if it is a norm layer to keep, wsconvert.rules.declare_norm it "
        "(docs/api.md, Extending wsconvert)"
    )


def _decide_custom_batchnorm(module: nn.Module, path: str, options: ConversionOptions) -> Decision:
    return skip(
        f"{type(module).__name__} subclasses BatchNorm but overrides forward(); a plain GroupNorm could drop "
        "what that forward adds (e.g. an activation). Register a rule for it (wsconvert.rules.register; "
        "docs/api.md, Extending wsconvert)"
    )


def _norm_act_to_group_norm_act(norm: nn.Module, decision: Decision, options: ConversionOptions) -> nn.Module:
    if options.norm == "bcn":
        return bcn.from_batchnorm(norm, decision.groups, decision.eps, options.bcn_estimate, act=True)
    from timm.layers import GroupNormAct  # the model holds a timm module, so timm is importable

    gn = group_norm(norm, decision, GroupNormAct)
    gn.drop = norm.drop
    gn.act = norm.act
    return gn


_COND_CONV_REASON = (
    "timm CondConv2d: its kernel is a per-sample, routing-weighted mix of expert kernels computed in forward, "
    "which wsconvert does not standardize (standardizing each expert would not standardize the mix); kept as is. "
    "To standardize it, register a rule whose module standardizes the mixed kernel (wsconvert.rules.register)"
)

RULES: list[Rule] = [
    Rule(
        "BatchNorm part of a BatchChannelNorm",
        matches=bcn.is_batch_channel_part,
        decide=lambda m, p, o: skip("the BatchNorm part of a BatchChannelNorm (already converted)"),
        apply=lambda m, d, o: m,
        kind="norm",
    ),
    already_standardized(*TIMM_STANDARDIZED_CONVS, name="timm standardized conv"),
    already_standardized(HF_BIT_CONV, name="transformers BiT WeightStandardizedConv2d"),
    already_standardized(*MMCV_STANDARDIZED_CONVS, name="mmcv ConvWS2d / ConvAWS2d"),
    already_standardized(
        match=_is_named_weight_standardized_conv, name="WeightStandardizedConv2d with its own forward"
    ),
    standardize(_ConvNd, name="convolution"),
    replace_norm(
        *TIMM_NORM_ACT, build=_norm_act_to_group_norm_act, becomes="GroupNormAct", bcn=True, name="timm norm+act"
    ),
    replace_norm(_BatchNorm, match=inherits_batchnorm_forward, bcn=True, name="batchnorm"),
    Rule(
        "batchnorm subclass with its own forward",
        matches=lambda m: isinstance(m, _BatchNorm),
        decide=_decide_custom_batchnorm,
        apply=lambda m, d, o: m,
        kind="norm",
    ),
    replace_norm(TORCHVISION_FROZEN_BATCHNORM, bcn=True, name="frozen batchnorm"),
    replace_norm(match=is_frozen_batchnorm_like, eps=_DETR_FROZEN_EPS, name="DETR-style frozen batchnorm"),
    keep(*TIMM_COND_CONV, reason=_COND_CONV_REASON, name="timm CondConv2d"),
    # Last: never drop a norm-like module silently; a user's rule is consulted before this one.
    Rule(
        "unrecognized norm-like layer",
        matches=lambda m: bool(_norm_like_evidence(m)),
        decide=_decide_unrecognized_norm,
        apply=lambda m, d, o: m,
    ),
]


def __getattr__(name: str) -> object:
    """``is_standardized`` lives in registry.py (it consults the registered rules too); kept importable here."""
    if name == "is_standardized":
        from .registry import is_standardized

        return is_standardized
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
