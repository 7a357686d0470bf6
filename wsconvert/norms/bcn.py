"""Batch-Channel Normalization (BCN) and estimated BatchNorm (EstBN), and how a BatchNorm becomes one.

BCN (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and Weight Standardization",
arXiv:1903.10520; also arXiv:1911.09738) normalizes twice: a per-channel BatchNorm (``bn``) that keeps the
batch knowledge channel-only norms lose, then a GroupNorm without affine over G groups on its output (each
sample's own statistics, in train and eval), then a per-GROUP affine ``weight``, ``bias`` of shape
(1, G, 1). This follows the authors' ``BCNorm`` (joe-siyuan-qiao/Batch-Channel-Normalization, README and
``imagenet/models/layers.py``). The group part is computed as one ``F.group_norm`` whose per-channel affine
repeats each group's value: the same numbers as normalize-then-scale, one kernel, and any layout
(channels_last) or dimensionality.

EstBN (the authors' ``EstBN``, for micro-batches) always normalizes with running estimates, in train and
eval. In training it first updates them without gradient at rate r: mean <- (1-r) mean + r batch_mean,
var <- (1-r) var + r mean((x - old_mean)^2) (the second moment about the OLD estimate), then normalizes with
the updated values. The authors keep r in a buffer ``estbn_moving_speed`` that defaults to 0, so their
statistics never move; here r is explicit and 0 < r <= 1 is enforced.

State-dict layout (the authors'): ``bn.weight``, ``bn.bias``, ``bn.running_mean``, ``bn.running_var``,
``bn.num_batches_tracked`` (plus ``bn.estbn_moving_speed`` in estimated mode), ``weight``, ``bias``. A
load_state_dict pre-hook also accepts the replaced BatchNorm's own keys (they go into ``bn``; the group
affine keeps its values) and the authors' ``pbn.*`` naming.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from .._optional import loaded_type
from .._validate import validate_estimate
from ..errors import InvalidOptionError

__all__ = [
    "BatchChannelNorm",
    "BatchChannelNormAct",
    "EstimatedBatchNorm",
    "bake_batch_channel_norms",
    "data_free_group_affine",
    "from_batchnorm",
    "is_batch_channel_part",
    "preserve_batch_channel_norms",
    "validate_estimate",
    "with_notes",
]

_RATE = "estbn_moving_speed"  # the authors' buffer name for r
_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_PART_FLAG = "_wsconvert_batch_channel_part"  # marks the BatchNorm inside a BatchChannelNorm (not converted again)
_BATCHNORM_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class EstimatedBatchNorm(nn.Module):
    """EstBN (arXiv:1903.10520, the authors' ``EstBN``): BatchNorm that always normalizes with running estimates.

    In training the estimates are first updated without gradient at rate ``rate`` (the variance about the
    old mean estimate), then used. ``sync=True`` (for a replaced SyncBatchNorm) pools the batch moments over
    the default process group (or ``process_group``) when torch.distributed is initialized, so every rank
    keeps the same estimates. Accepts (N, C) and (N, C, *) inputs.
    """

    def __init__(
        self,
        num_features: int,
        rate: float,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        dim: int = 2,
        sync: bool = False,
        process_group: object = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        rate = validate_estimate(rate, "rate")
        if rate is None:
            raise InvalidOptionError("EstimatedBatchNorm needs a rate r with 0 < r <= 1, got None")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.dim = dim
        self.sync = sync
        self.process_group = process_group
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer(_RATE, torch.full((1,), rate, **factory))

    @property
    def rate(self) -> float:
        return float(getattr(self, _RATE).item())

    def extra_repr(self) -> str:
        return f"{self.num_features}, rate={self.rate}, eps={self.eps}, affine={self.affine}, sync={self.sync}"

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        mean_estimate, var_estimate = self.running_mean, self.running_var
        values = x.detach().to(mean_estimate.dtype)  # mixed precision: statistics in the buffers' dtype
        dims = [0, *range(2, x.dim())]
        batch_var, batch_mean = torch.var_mean(values, dim=dims, correction=0)
        about_old = batch_var + (batch_mean - mean_estimate).square()  # mean((x - old_mean)^2), per channel
        if self.sync and _distributed() and torch.distributed.get_world_size(self.process_group) > 1:
            # the second moment about the shared old estimate is additive over ranks: pool count-weighted sums
            count = values.numel() // values.shape[1]
            packed = torch.cat([batch_mean * count, about_old * count, batch_mean.new_full((1,), count)])
            torch.distributed.all_reduce(packed, group=self.process_group)
            channels = self.num_features
            batch_mean = packed[:channels] / packed[-1]
            about_old = packed[channels : 2 * channels] / packed[-1]
        rate = getattr(self, _RATE)
        mean_estimate.lerp_(batch_mean, rate)
        var_estimate.lerp_(about_old, rate)
        self.num_batches_tracked.add_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input of shape (N, {self.num_features}, *), got {tuple(x.shape)}")
        mean, var = self.running_mean, self.running_var
        if self.training:
            self._update(x)
            # a later update must not change tensors that this forward saved for backward
            mean, var = mean.clone(), var.clone()
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


def _is_frozen(module: nn.Module) -> bool:
    return isinstance(module, nn.Module) and "Frozen" in type(module).__name__ and not isinstance(module, _BatchNorm)


def _make_inner(
    num_channels: int,
    eps: float,
    estimate: float | None,
    dim: int,
    sync: bool,
    momentum: float | None,
    affine: bool,
    track_running_stats: bool,
    factory: dict,
) -> nn.Module:
    if estimate is not None:
        return EstimatedBatchNorm(num_channels, estimate, eps, affine, dim=dim, sync=sync, **factory)
    cls = nn.SyncBatchNorm if sync else _BATCHNORM_CLASSES[dim]
    return cls(num_channels, eps, momentum, affine, track_running_stats, **factory)


class BatchChannelNorm(nn.Module):
    """BCN (arXiv:1903.10520): per-channel BatchNorm ``bn``, GroupNorm(G) without affine, per-group affine.

    ``bn`` is a ``BatchNorm{dim}d`` (``nn.SyncBatchNorm`` with ``sync=True``) or, with ``estimate=r``, an
    :class:`EstimatedBatchNorm` with rate r. ``weight`` and ``bias`` have shape (1, num_groups, 1), init 1
    and 0, as in the authors' ``BCNorm``. ``eps`` is the group part's; the BatchNorm part uses ``bn_eps``
    (default: ``eps``). Pass ``bn`` to use an existing module as the BatchNorm part.
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int,
        eps: float = 1e-5,
        *,
        estimate: float | None = None,
        dim: int = 2,
        sync: bool = False,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        bn_eps: float | None = None,
        bn: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise InvalidOptionError(
                f"num_groups={num_groups} must be >= 1 and divide num_channels={num_channels} "
                "(wsconvert.rules.choose_groups picks the largest divisor below a requested count)"
            )
        if dim not in _BATCHNORM_CLASSES:
            raise InvalidOptionError(f"dim={dim!r} must be 1, 2 or 3 (BatchNorm1d/2d/3d)")
        estimate = validate_estimate(estimate, "estimate")
        factory = {"device": device, "dtype": dtype}
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.dim = dim
        self.estimate = estimate
        if bn is None:
            bn_eps = eps if bn_eps is None else bn_eps
            bn = _make_inner(num_channels, bn_eps, estimate, dim, sync, momentum, affine, track_running_stats, factory)
        setattr(bn, _PART_FLAG, True)
        self.bn = bn
        self.weight = nn.Parameter(torch.ones(1, num_groups, 1, **factory))
        self.bias = nn.Parameter(torch.zeros(1, num_groups, 1, **factory))
        # names of bn's state that the replaced layer's checkpoint cannot have, filled on load
        self._filled_on_load: tuple[str, ...] = (_RATE,) if estimate is not None else ()
        self.register_load_state_dict_pre_hook(_load_replaced_layout)

    def extra_repr(self) -> str:
        mode = f", estimate={self.estimate}" if self.estimate is not None else ""
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}{mode}"

    def channel_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-group affine repeated for every channel of its group: two tensors of shape (C,)."""
        per_group = self.num_channels // self.num_groups
        weight = self.weight.reshape(self.num_groups, 1).expand(self.num_groups, per_group).reshape(-1)
        bias = self.bias.reshape(self.num_groups, 1).expand(self.num_groups, per_group).reshape(-1)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.channel_affine()
        return F.group_norm(self.bn(x), self.num_groups, weight, bias, self.eps)


class BatchChannelNormAct(BatchChannelNorm):
    """BatchChannelNorm followed by ``drop`` and ``act``, for timm's BatchNormAct2d family (its order)."""

    def __init__(self, *args: object, drop: nn.Module | None = None, act: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def is_batch_channel_part(module: nn.Module) -> bool:
    """True for the BatchNorm inside a BatchChannelNorm (a converted model's; it is not converted again)."""
    return bool(module.__dict__.get(_PART_FLAG, False))


# --- loading checkpoints of the replaced layer and of the authors' code ---------------------------


def _load_replaced_layout(module: BatchChannelNorm, state_dict: dict, prefix: str, *args: object) -> None:
    inner, authors = prefix + "bn.", prefix + "pbn."
    for key in [k for k in state_dict if k.startswith(authors)]:
        state_dict.setdefault(inner + key[len(authors) :], state_dict.pop(key))
    if not any(k.startswith(inner) for k in state_dict):
        weight = state_dict.get(prefix + "weight")
        replaced = any(prefix + n in state_dict for n in _BN_STATE[2:]) or (weight is not None and weight.dim() == 1)
        if not replaced:
            return  # nothing of this layer in the checkpoint: let strict loading say what is missing
        for name in _BN_STATE:
            if prefix + name in state_dict:
                state_dict[inner + name] = state_dict.pop(prefix + name)
        own = {"weight": module.weight, "bias": module.bias}
        for name, tensor in own.items():
            state_dict.setdefault(prefix + name, tensor.detach())
        current = module.bn.state_dict(keep_vars=True)
        for name in module._filled_on_load:
            if name in current:
                state_dict.setdefault(inner + name, current[name].detach())
    rate_key = inner + _RATE
    if rate_key in state_dict and hasattr(module.bn, _RATE):
        loaded = float(state_dict[rate_key].reshape(-1)[0])
        if not 0 < loaded <= 1:
            warnings.warn(
                f"{prefix[:-1] or '<model>'}: the checkpoint's {_RATE}={loaded} (the reference code's default 0 "
                f"never updates the statistics) is ignored; keeping the configured rate {module.bn.rate}",
                stacklevel=2,
            )
            state_dict[rate_key] = getattr(module.bn, _RATE).detach()


# --- conversion -----------------------------------------------------------------------------------


def _dim_of(norm: nn.Module) -> int:
    for dim, cls in _BATCHNORM_CLASSES.items():
        if isinstance(norm, cls):
            return dim
    return 2  # SyncBatchNorm and 2-d frozen layers


def _frozen_inner(norm: nn.Module, channels: int) -> nn.Module:
    """A frozen BatchNorm of the same family as ``norm`` (statistics and affine fixed), sharing its tensors."""
    vision_frozen = loaded_type("torchvision.ops.misc", "FrozenBatchNorm2d")
    if vision_frozen is not None and isinstance(norm, vision_frozen):
        inner = vision_frozen(channels, eps=norm.eps)
    else:
        from timm.layers.norm_act import FrozenBatchNorm2d  # a timm frozen layer: timm is importable

        inner = FrozenBatchNorm2d(channels, eps=norm.eps, device="meta")
    for name in ("weight", "bias", "running_mean", "running_var"):
        setattr(inner, name, getattr(norm, name))
    return inner


def _share_state(norm: nn.Module, inner: nn.Module) -> None:
    """Give ``inner`` the replaced layer's very Parameters and buffers (no copy; an optimizer keeps working)."""
    for name in _BN_STATE:
        value = getattr(norm, name, None)
        if isinstance(value, torch.Tensor) and getattr(inner, name, None) is not None:
            setattr(inner, name, value)


def from_batchnorm(
    norm: nn.Module,
    groups: int,
    eps: float,
    estimate: float | None = None,
    *,
    act: bool = False,
) -> BatchChannelNorm:
    """The BatchChannelNorm that replaces ``norm``: its BatchNorm part is ``norm``'s trained state.

    ``norm`` is a BatchNorm1d/2d/3d, SyncBatchNorm, a frozen BatchNorm (torchvision FrozenBatchNorm2d,
    timm FrozenBatchNormAct2d) or a timm BatchNormAct2d/SyncBatchNormAct (``act=True``: its ``drop`` and
    ``act`` are kept around the BCN). ``eps`` is the group part's. A frozen layer stays frozen: its BatchNorm
    part is a frozen BatchNorm (``estimate`` does not apply: its statistics never update) and the group affine
    does not train. The group affine trains when the replaced weight did.
    """
    weight = getattr(norm, "weight", None)
    reference = next((t for t in (weight, getattr(norm, "running_mean", None)) if isinstance(t, torch.Tensor)), None)
    factory = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
    channels = int(norm.num_features if hasattr(norm, "num_features") else weight.shape[0])
    frozen = _is_frozen(norm)
    sync = isinstance(norm, nn.SyncBatchNorm)
    dim = _dim_of(norm)
    if frozen:
        inner = _frozen_inner(norm, channels)
        estimate = None
    else:
        inner = _make_inner(
            channels,
            float(norm.eps),
            estimate,
            dim,
            sync,
            norm.momentum,
            norm.affine,
            norm.track_running_stats or estimate is not None,
            factory,
        )
        _share_state(norm, inner)
        if sync:
            inner.process_group = norm.process_group
        inner.training = norm.training
    cls = BatchChannelNormAct if act else BatchChannelNorm
    extra = {"drop": norm.drop, "act": norm.act} if act else {}
    bcn = cls(channels, groups, eps, estimate=estimate, dim=dim, sync=sync, bn=inner, **factory, **extra)
    if estimate is not None and not norm.track_running_stats:
        bcn._filled_on_load += ("running_mean", "running_var", "num_batches_tracked")
    trains = isinstance(weight, nn.Parameter) and weight.requires_grad if weight is not None else not frozen
    bcn.weight.requires_grad_(trains)
    bcn.bias.requires_grad_(trains)
    return bcn


def with_notes(decision: object, norm: nn.Module, path: str, options: object) -> object:
    """A rules ``Decision`` for a BatchChannelNorm replacement: skipped (with the reason) when the BatchNorm's
    affine carries a parametrization, which the BCN's shared inner BatchNorm cannot hold; with a note where
    ``bcn_estimate`` does not apply."""
    if decision.action == "replace" and parametrize.is_parametrized(norm):
        names = ", ".join(name for name in ("weight", "bias") if parametrize.is_parametrized(norm, name))
        return dataclasses.replace(
            decision,
            action="skip",
            reason=f"its {names} carries a parametrization, which a BatchChannelNorm cannot keep yet; "
            "convert it with norm='gn' (which carries the parametrization over) or remove the parametrization",
            becomes="",
            groups=None,
            channels=None,
            eps=None,
            notes=(),
        )
    if decision.action != "replace" or options.bcn_estimate is None or not _is_frozen(norm):
        return decision
    note = (
        f"{path or '<model>'}: {type(norm).__name__} is frozen, so its BatchChannelNorm keeps a frozen BatchNorm "
        "part (fixed statistics); bcn_estimate does not apply to it"
    )
    return dataclasses.replace(decision, notes=(*decision.notes, note))


# --- function preservation (data-free) ------------------------------------------------------------


def _bn_output_moments(bn: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of ``bn``'s output when its input has its running statistics."""
    weight = getattr(bn, "weight", None)
    bias = getattr(bn, "bias", None)
    reference = next(t for t in (weight, getattr(bn, "running_mean", None), torch.ones(channels)) if t is not None)
    gamma = weight.detach() if weight is not None else torch.ones_like(reference)
    beta = bias.detach() if bias is not None else torch.zeros_like(reference)
    var = getattr(bn, "running_var", None)
    if var is None:  # batch statistics: the output has variance gamma^2 (up to eps)
        return beta.float(), gamma.float().square()
    var = var.detach().float()
    return beta.float(), gamma.float().square() * var / (var + float(bn.eps))


@torch.no_grad()
def data_free_group_affine(bcn: BatchChannelNorm) -> None:
    """Set the group affine so that ``bcn`` outputs what its BatchNorm part alone outputs (function preservation).

    The BatchNorm part's output channel c has mean beta_c and variance gamma_c^2 v_c / (v_c + eps) when its
    input has the running statistics (m_c, v_c) (the same assumption the running statistics make). Pooling
    a group's channels gives mu_g = mean_c beta_c and sigma_g^2 = mean_c(var_c + beta_c^2) - mu_g^2. With
    weight_g = sqrt(sigma_g^2 + eps) and bias_g = mu_g the group part maps y to
    weight_g (y - mu_g) / sqrt(sigma_g^2 + eps) + bias_g = y for every sample whose group statistics are those
    (exact then; close when a sample's statistics are near the dataset's).
    """
    mean, var = _bn_output_moments(bcn.bn, bcn.num_channels)
    groups = bcn.num_groups
    mean_g = mean.reshape(groups, -1).mean(1)
    second_g = (var + mean.square()).reshape(groups, -1).mean(1)
    var_g = (second_g - mean_g.square()).clamp_min(0)
    bcn.weight.copy_((var_g + bcn.eps).sqrt().reshape(1, groups, 1))
    bcn.bias.copy_(mean_g.reshape(1, groups, 1))


def preserve_batch_channel_norms(root: nn.Module, steps: object) -> int:
    """:func:`data_free_group_affine` on every BatchChannelNorm the walk's ``steps`` placed under ``root``
    (``preserve=True``); returns how many. The BatchNorm part is the trained BatchNorm itself, so with this the
    converted layer starts from the function the BatchNorm computed (exact under the running-statistics
    assumption). calibration_data does not refine it (wsconvert.preserve.calibrate fits GroupNorm affines only)."""
    count = 0
    for step in steps:
        if step.decision.action != "replace" or not step.site.parents:
            continue
        parent, name = step.site.parents[0]
        new = root if parent is None else parent._modules[name]
        if isinstance(new, BatchChannelNorm):
            data_free_group_affine(new)
            count += 1
    return count


# --- bake -----------------------------------------------------------------------------------------


def _plain_batchnorm(bn: nn.Module, dim: int) -> nn.Module:
    """An nn.BatchNorm{dim}d equal in eval to ``bn`` (running statistics), sharing its tensors; frozen kept."""
    if _is_frozen(bn) or type(bn) in _BATCHNORM_CLASSES.values():
        return bn
    running = isinstance(bn, EstimatedBatchNorm) or bn.track_running_stats
    plain = _BATCHNORM_CLASSES[dim](
        bn.num_features, bn.eps, affine=bn.affine, track_running_stats=running, device="meta"
    )
    _share_state(bn, plain)
    plain.training = bn.training
    return plain


def baked(bcn: BatchChannelNorm) -> nn.Sequential:
    """Plain torch modules equal to ``bcn`` in eval: its BatchNorm (running statistics), then nn.GroupNorm."""
    bn = _plain_batchnorm(bcn.bn, bcn.dim)
    bn.__dict__.pop(_PART_FLAG, None)
    weight, bias = bcn.channel_affine()
    gn = nn.GroupNorm(bcn.num_groups, bcn.num_channels, bcn.eps, device="meta")
    gn.weight = nn.Parameter(weight.detach().clone(), requires_grad=bcn.weight.requires_grad)
    gn.bias = nn.Parameter(bias.detach().clone(), requires_grad=bcn.bias.requires_grad)
    parts: list[tuple[str, nn.Module]] = [("bn", bn), ("gn", gn)]
    if isinstance(bcn, BatchChannelNormAct):
        parts += [("drop", bcn.drop), ("act", bcn.act)]
    sequential = nn.Sequential(OrderedDict(parts))
    sequential.training = bcn.training
    gn.training = bcn.training
    return sequential


def bake_batch_channel_norms(root: nn.Module) -> nn.Module:
    """Replace every BatchChannelNorm under ``root`` (at every path it has) by :func:`baked`; the new root."""
    from ..walk import carry_module_state, find_sites  # walk imports the rules, which import this module

    for site in find_sites(root):
        if not isinstance(site.module, BatchChannelNorm):
            continue
        new = baked(site.module)
        carry_module_state(site.module, new)
        for parent, name in site.parents:
            if parent is None:
                root = new
            else:
                parent._modules[name] = new
    return root
