"""GroupNorm affines that keep what the replaced BatchNorm computed (``preserve=True`` with ``gn=G``).

An eval-mode BatchNorm computes y_c = g_c (x_c - m_c) / s_c + b_c with s_c = sqrt(v_c + eps) from its running
statistics; a GroupNorm normalizes each sample by its own group statistics. Copying gamma/beta over (what
converters do) gives a different function ("very bad accuracy", ppwwyyxx/GroupNorm-reproduce#2).

Data-free (``set_affines_from_batchnorm``): assume a sample's group statistics equal the dataset's, estimated
from the BatchNorm buffers: mu_g = mean_{c in g} m_c, sigma_g^2 = mean_{c in g} (v_c + m_c^2) - mu_g^2. Then
GN weight_c = g_c sqrt(sigma_g^2 + eps_gn) / s_c and bias_c = b_c + g_c (mu_g - m_c) / s_c reproduce y_c
exactly when that assumption holds.

Calibrated (``fit_affines``): for every GroupNorm, in forward order, a closed-form per-channel least-squares
fit y_c ~ w_c z_c + b_c of the original model's BatchNorm output y (computed from the BatchNorm's input with its
running statistics, so activations fused into the module or applied in place cannot alter it) on the converted
model's normalized GroupNorm input z = GN(x) without affine, over all calibration samples and positions. Layers
are fitted one after the other, so each fit sees the already fitted earlier layers. Memory stays bounded: per
channel only the sums n, sum z, sum z^2, sum y, sum zy are kept (float64), and each pass stops at the layer it
fits. The fitted values are copied into the GroupNorm's existing weight/bias Parameters (an optimizer built
afterwards, or holding the BatchNorm's gamma/beta, sees them).

Distilled (``distill_affines``, after the fit): a per-layer fit cannot undo per-sample normalization, and its
errors add up through the network. So the GroupNorm affines (and nothing else: W, gain/shift, other norms are
frozen) are then trained end to end to reproduce the original model (knowledge distillation, Hinton et al. 2015,
arXiv:1503.02531): KL(original softmax || converted softmax) for (N, K) outputs, else the relative squared error
of the outputs, plus FEATURE_WEIGHT times the mean relative squared error of each GroupNorm's output against the
original BatchNorm's output on the same input. 64 images are few for ~10^4 affine parameters, so every step also
distills on mixup inputs (lam * x_i + (1 - lam) * x_j, Zhang et al. 2018, arXiv:1710.09412) labelled by the
original model itself, which the original can do for any input. Adam with a cosine-decayed step size,
DISTILL_STEPS steps, one calibration batch of at most CALIBRATION_CHUNK samples per step (round robin), seeded;
the result is kept only if it lowers that loss on the calibration data plus a fixed mixup of it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..errors import CheckpointError, InvalidOptionError, WSConvertError

__all__ = [
    "NormPair",
    "calibration_batches",
    "load_calibration_file",
    "norm_pairs",
    "norm_output",
    "set_affines_from_batchnorm",
    "fit_affines",
    "distill_affines",
    "DISTILL_STEPS",
    "model_device",
    "run_model",
]

NormPair = tuple[str, nn.Module, nn.Module]  # (path, the replaced BatchNorm, the GroupNorm now at that path)


def calibration_batches(data: object, *, preserve: bool) -> list[Tensor] | None:
    """The calibration inputs as a list of batches, validated; None when ``data`` is None.

    ``data`` is a Tensor (one batch) or an iterable of batches, each a Tensor or a tuple/list whose first
    element is the input Tensor (what a DataLoader yields). The batches are kept for the layer-by-layer passes.
    """
    if data is None:
        return None
    if not preserve:
        raise InvalidOptionError(
            "calibration_data is only used with preserve=True (it fits the GroupNorm affines to the original "
            "model and measures the fidelity); pass preserve=True, or drop calibration_data"
        )
    if isinstance(data, Tensor):
        items: list[object] = [data]
    elif isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise InvalidOptionError(
            f"calibration_data must be a Tensor of inputs or an iterable of batches (a DataLoader, a list of "
            f"Tensors or of (input, target) tuples), got {type(data).__name__}"
        )
    else:
        items = list(data)
    if not items:
        raise InvalidOptionError("calibration_data holds no batch; pass at least one batch of inputs")
    batches = []
    for index, item in enumerate(items):
        batch = item[0] if isinstance(item, (tuple, list)) and item else item
        if not isinstance(batch, Tensor):
            raise InvalidOptionError(
                f"calibration_data batch {index} is a {type(item).__name__}"
                + (f" whose first element is a {type(batch).__name__}" if batch is not item else "")
                + "; each batch must be a Tensor of inputs or a tuple/list whose first element is one"
            )
        if batch.dim() == 0 or batch.shape[0] == 0:
            raise InvalidOptionError(
                f"calibration_data batch {index} has shape {tuple(batch.shape)}; it needs a batch dimension "
                "with at least one sample"
            )
        batches.append(batch)
    return batches


def model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the layer of interest has run."""


def run_model(model: nn.Module, batch: Tensor, index: int, *, what: str) -> object:
    """``model(batch)`` on the model's device, in eval mode without gradients; WSConvertError if it fails."""
    device = model_device(model)
    if device.type == "meta":
        raise WSConvertError(f"calibration needs the {what} model's weights, but they are on the meta device")
    try:
        return model(batch.to(device))
    except _Stop:
        raise
    except Exception as error:  # the model's own forward can raise anything
        raise InvalidOptionError(
            f"the {what} model cannot run calibration_data batch {index} of shape {tuple(batch.shape)} "
            f"({type(error).__name__}: {' '.join(str(error).split())[:300]}); pass inputs the model accepts"
        ) from None


class eval_mode:
    """Eval mode and no gradients for the given models; every module's training flag is restored on exit."""

    def __init__(self, *models: nn.Module) -> None:
        self.flags = [(m, m.training) for model in models for m in model.modules()]
        self.grad = torch.no_grad()

    def __enter__(self) -> None:
        self.grad.__enter__()
        for module, _ in self.flags:
            module.training = False

    def __exit__(self, *exc: object) -> None:
        for module, training in self.flags:
            module.training = training
        self.grad.__exit__(*exc)


def _replacement(root: nn.Module, step: object) -> nn.Module:
    parent, name = step.site.parents[0]
    return root if parent is None else parent._modules[name]


def norm_pairs(converted: nn.Module, steps: Sequence) -> list[NormPair]:
    """(path, replaced norm, GroupNorm now at its place) for every norm layer the walk replaced by a GroupNorm."""
    pairs = []
    for step in steps:
        if step.decision.action != "replace":
            continue
        new = _replacement(converted, step)
        if isinstance(new, nn.GroupNorm) and new is not step.site.module:
            pairs.append((step.site.paths[0], step.site.module, new))
    return pairs


def _batchnorm_terms(norm: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """(m, v, gamma, beta) of an eval-mode BatchNorm-like module, None when it has no running statistics."""
    mean, var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    if not isinstance(mean, Tensor) or not isinstance(var, Tensor):
        return None
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    gamma = weight.detach() if isinstance(weight, Tensor) else torch.ones_like(mean)
    beta = bias.detach() if isinstance(bias, Tensor) else torch.zeros_like(mean)
    return mean.detach(), var.detach(), gamma, beta


def norm_output(norm: nn.Module, x: Tensor) -> Tensor | None:
    """What ``norm`` computes from ``x`` in eval mode before any fused activation: GroupNorm with its affine,
    or BatchNorm with its running statistics; None for other layers."""
    if isinstance(norm, nn.GroupNorm):
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    terms = _batchnorm_terms(norm)
    if terms is None:
        return None
    mean, var, gamma, beta = terms
    return F.batch_norm(x, mean, var, gamma, beta, False, 0.0, float(norm.eps))


def set_affines_from_batchnorm(pairs: Sequence[NormPair]) -> list[str]:
    """The data-free GroupNorm affine from each replaced BatchNorm's buffers (module docstring); returns the
    paths it set. Norms without running statistics, or GroupNorms without an affine, are left as they are."""
    done = []
    with torch.no_grad():
        for path, old, gn in pairs:
            terms = _batchnorm_terms(old)
            if terms is None or gn.weight is None or gn.bias is None:
                continue
            m, v, g, b = (t.double() for t in terms)
            eps = max(float(old.eps), 0.0)
            s = (v + eps).sqrt().clamp_min(1e-12)
            groups = gn.num_groups
            mu_g = m.view(groups, -1).mean(1)
            var_g = ((v + m * m).view(groups, -1).mean(1) - mu_g * mu_g).clamp_min(0)
            sigma = (var_g + gn.eps).sqrt().repeat_interleave(m.numel() // groups)
            mu = mu_g.repeat_interleave(m.numel() // groups)
            gn.weight.copy_((g * sigma / s).to(gn.weight.dtype))
            gn.bias.copy_((b + g * (mu - m) / s).to(gn.bias.dtype))
            done.append(path)
    return done


def _capture(model: nn.Module, module: nn.Module, batch: Tensor, index: int, what: str, compute) -> Tensor | None:
    """Run ``model`` on ``batch`` until ``module`` is first called; return ``compute(module, its input)``."""
    found: list[Tensor] = []

    def hook(mod: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            found.append(compute(mod, args[0]))
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        run_model(model, batch, index, what=what)
    except _Stop:
        pass
    finally:
        handle.remove()
    return found[0] if found else None


def _normalized(gn: nn.Module, x: Tensor) -> Tensor:
    return F.group_norm(x, gn.num_groups, None, None, gn.eps)


def _channel_sums(t: Tensor) -> Tensor:
    dims = [d for d in range(t.dim()) if d != 1]
    return t.sum(dims) if dims else t


def _fittable_original(reference: nn.Module, path: str, gn: nn.Module) -> nn.Module | None:
    """The BatchNorm at ``path`` in ``reference`` that the GroupNorm ``gn`` replaced, when ``gn`` has an affine to
    fit and that BatchNorm has running statistics to fit it to; else None."""
    if gn.weight is None or gn.bias is None:
        return None
    try:
        original = reference.get_submodule(path)
    except AttributeError:
        return None
    return original if _batchnorm_terms(original) is not None else None


def fit_affines(reference: nn.Module, converted: nn.Module, pairs: Sequence[NormPair], batches: list[Tensor]) -> set:
    """Least-squares fit of every paired GroupNorm's affine, layer by layer in forward order; returns the paths
    fitted. ``reference`` is the unconverted model; the replaced norms are looked up in it by path."""
    fitted: set[str] = set()
    with eval_mode(reference, converted):
        order = _forward_order(converted, pairs, batches[0])
        for path, _, gn in order:
            original = _fittable_original(reference, path, gn)
            if original is None:
                continue
            sums = None
            for index, batch in enumerate(batches):
                y = _capture(reference, original, batch, index, "original", norm_output)
                z = _capture(converted, gn, batch, index, "converted", _normalized)
                if y is None or z is None or y.shape != z.shape:
                    sums = None
                    break
                y, z = y.double(), z.double()
                n = torch.full_like(_channel_sums(z), z.numel() / z.shape[1])
                part = torch.stack([n, _channel_sums(z), _channel_sums(z * z), _channel_sums(y), _channel_sums(z * y)])
                sums = part if sums is None else sums + part
            if sums is None:
                continue
            n, sz, szz, sy, szy = sums
            var_z = szz / n - (sz / n) ** 2
            cov = szy / n - (sz / n) * (sy / n)
            usable = var_z > 1e-12
            weight = torch.where(usable, cov / var_z.clamp_min(1e-12), gn.weight.detach().double())
            bias = torch.where(usable, (sy - weight * sz) / n, gn.bias.detach().double())
            with torch.no_grad():
                gn.weight.copy_(weight.to(gn.weight.dtype))
                gn.bias.copy_(bias.to(gn.bias.dtype))
            fitted.add(path)
    return fitted


DISTILL_STEPS = 100  # Adam steps of the end-to-end distillation of the GroupNorm affines (0: off)
DISTILL_LR = 1e-2
FEATURE_WEIGHT = 0.1  # weight of the per-layer GroupNorm-vs-BatchNorm output term
DISTILL_SEED = 0


class _train_flags:
    """Eval mode (gradients left on) for the given models; every module's training flag is restored on exit."""

    def __init__(self, *models: nn.Module) -> None:
        self.flags = [(m, m.training) for model in models for m in model.modules()]

    def __enter__(self) -> None:
        for module, _ in self.flags:
            module.training = False

    def __exit__(self, *exc: object) -> None:
        for module, training in self.flags:
            module.training = training


def _record_outputs(modules: Mapping[str, nn.Module], store: dict[str, list[Tensor]], detach: bool) -> list:
    """Pre-hooks appending what each module computes from its input (``norm_output``, before any activation, so
    in-place activations cannot alter it) to ``store[path]``, one entry per call."""

    def hook_for(path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], Tensor):
                y = norm_output(module, args[0])
                if y is not None:
                    store.setdefault(path, []).append(y.detach() if detach else y)

        return hook

    return [module.register_forward_pre_hook(hook_for(path)) for path, module in modules.items()]


def _output_loss(got: object, want: object) -> Tensor | None:
    """KL(softmax(want) || softmax(got)) for (N, K) logits, else the mean relative squared error of the outputs."""
    from torch.utils._pytree import tree_leaves

    gots = [t for t in tree_leaves(got) if isinstance(t, Tensor) and t.is_floating_point()]
    wants = [t for t in tree_leaves(want) if isinstance(t, Tensor) and t.is_floating_point()]
    if not gots or len(gots) != len(wants) or any(a.shape != b.shape for a, b in zip(gots, wants, strict=True)):
        return None
    a, b = gots[0], wants[0]
    if len(gots) == 1 and a.dim() == 2 and a.shape[1] > 1:
        return F.kl_div(
            F.log_softmax(a.float(), 1), F.log_softmax(b.float(), 1), log_target=True, reduction="batchmean"
        )
    terms = [
        (a.float() - b.float()).pow(2).sum() / b.float().pow(2).sum().clamp_min(1e-12)
        for a, b in zip(gots, wants, strict=True)
    ]
    return torch.stack(terms).mean()


def _mixup(batch: Tensor, generator: torch.Generator) -> Tensor:
    """``batch`` followed by its mixup lam * x_i + (1 - lam) * x_perm(i) (arXiv:1710.09412); only the batch for
    non-floating inputs (token ids) or a single sample."""
    n = batch.shape[0]
    if not batch.is_floating_point() or n < 2:
        return batch
    lam = torch.rand((n,) + (1,) * (batch.dim() - 1), generator=generator).to(batch.device, batch.dtype)
    perm = torch.randperm(n, generator=generator).to(batch.device)
    return torch.cat([batch, lam * batch + (1 - lam) * batch[perm]])


def _rebatched(batches: list[Tensor]) -> list[Tensor]:
    """The samples of ``batches`` in chunks of CALIBRATION_CHUNK when they can be concatenated (same dtype,
    device and sample shape), so that the distillation does not depend on how a loader split them."""
    first = batches[0]
    if len(batches) == 1 and first.shape[0] <= CALIBRATION_CHUNK:
        return batches
    if any(b.dtype != first.dtype or b.device != first.device or b.shape[1:] != first.shape[1:] for b in batches):
        return batches
    return list(torch.cat(batches).split(CALIBRATION_CHUNK))


def distill_affines(
    reference: nn.Module,
    converted: nn.Module,
    pairs: Sequence[NormPair],
    batches: list[Tensor],
    *,
    steps: int | None = None,
    lr: float = DISTILL_LR,
    feature_weight: float = FEATURE_WEIGHT,
    seed: int = DISTILL_SEED,
) -> set[str]:
    """Train only the paired GroupNorms' weight/bias (in place, the same Parameter objects) so that ``converted``
    reproduces ``reference`` on ``batches`` (module docstring). Every other parameter's values, requires_grad and
    .grad, and every module's training flag, are as before on return. Returns the paths it changed (empty when
    there was nothing to train, or when the result did not lower the loss on the calibration data). ``steps``
    None: DISTILL_STEPS, read at call time."""
    steps = DISTILL_STEPS if steps is None else steps
    gns: dict[str, nn.Module] = {}
    originals: dict[str, nn.Module] = {}
    for path, _, gn in pairs:
        original = _fittable_original(reference, path, gn)
        if original is not None:
            gns[path], originals[path] = gn, original
    params = [p for gn in gns.values() for p in (gn.weight, gn.bias)]
    if steps <= 0 or not params:
        return set()
    batches = _rebatched(batches)
    generator = torch.Generator().manual_seed(seed)
    every = list(converted.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in every]
    start = [p.detach().clone() for p in params]

    def loss_on(batch: Tensor, index: int) -> Tensor | None:
        want: dict[str, list[Tensor]] = {}
        got: dict[str, list[Tensor]] = {}
        handles = _record_outputs(originals, want, detach=True)
        try:
            with torch.no_grad():
                target = run_model(reference, batch, index, what="original")
        finally:
            for handle in handles:
                handle.remove()
        handles = _record_outputs(gns, got, detach=False)
        try:
            output = run_model(converted, batch, index, what="converted")
        finally:
            for handle in handles:
                handle.remove()
        loss = _output_loss(output, target)
        if loss is None:
            return None
        features = [
            (a.float() - b.float()).pow(2).sum() / b.float().pow(2).sum().clamp_min(1e-12)
            for path in got
            for a, b in zip(got[path], want.get(path, []), strict=False)
            if a.shape == b.shape
        ]
        if features and feature_weight:
            loss = loss + feature_weight * torch.stack(features).mean()
        return loss

    check = torch.Generator().manual_seed(seed + 1)
    checks = [_mixup(batch, check) for batch in batches]  # fixed: the same inputs before and after

    def calibration_loss() -> float | None:
        total = 0.0
        with torch.no_grad():
            for index, batch in enumerate(checks):
                loss = loss_on(batch, index)
                if loss is None:
                    return None
                total += float(loss)
        return total

    with _train_flags(reference, converted), torch.enable_grad():
        try:
            for p in every:
                p.requires_grad_(False)
                p.grad = None
            before = calibration_loss()
            if before is None:
                return set()
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(params, lr=lr)
            for step in range(steps):
                for group in optimizer.param_groups:  # cosine decay to 0 (SGDR, arXiv:1608.03983), settles the fit
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                index = step % len(batches)
                loss = loss_on(_mixup(batches[index], generator), index)
                if loss is None or not torch.isfinite(loss):
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            for p in params:
                p.requires_grad_(False)
            after = calibration_loss()
            if after is None or not after < before:
                with torch.no_grad():
                    for p, value in zip(params, start, strict=True):
                        p.copy_(value)
                return set()
        finally:
            for p, flag, grad in saved:
                p.requires_grad_(flag)
                p.grad = grad
    return set(gns)


def _forward_order(converted: nn.Module, pairs: Sequence[NormPair], batch: Tensor) -> list[NormPair]:
    """``pairs`` in the order their GroupNorms first run on ``batch`` (pairs that never run come last)."""
    first: dict[int, int] = {}
    handles = []
    for _, _, gn in pairs:

        def hook(mod: nn.Module, args: tuple) -> None:
            first.setdefault(id(mod), len(first))

        handles.append(gn.register_forward_pre_hook(hook))
    try:
        run_model(converted, batch, 0, what="converted")
    finally:
        for handle in handles:
            handle.remove()
    return sorted(pairs, key=lambda pair: first.get(id(pair[2]), len(first)))


CALIBRATION_CHUNK = 64  # samples per forward pass when the calibration inputs come from a file


def load_calibration_file(path: str | os.PathLike, model: nn.Module | None = None) -> list[Tensor]:
    """The inputs saved in ``path`` (``torch.save`` of one Tensor, a safetensors file holding one tensor, or
    ``.npy``), checked (floating point, a batch dimension, the channels of the model's first conv), as batches
    of at most CALIBRATION_CHUNK samples. CheckpointError / InvalidOptionError name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"calibration file {path} does not exist (or is not a file)")
    with open(path, "rb") as handle:
        head = handle.read(16)
    try:
        if head.startswith(b"\x93NUMPY"):
            import numpy as np

            data = torch.from_numpy(np.load(path, allow_pickle=False))
        elif len(head) >= 9 and head[8:9] == b"{":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise CheckpointError(
                    f"calibration file {path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:3])}); "
                    "save exactly one tensor of inputs"
                )
            data = next(iter(tensors.values()))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as error:  # numpy, safetensors and torch raise many types for a bad file
        message = " ".join(str(error).split())[:200]
        raise CheckpointError(
            f"cannot read calibration file {path} ({type(error).__name__}: {message}); save one Tensor of inputs "
            "with torch.save, safetensors or numpy.save"
        ) from None
    if not isinstance(data, Tensor):
        raise CheckpointError(
            f"calibration file {path} holds a {type(data).__name__}, not a Tensor; save one Tensor of inputs "
            "(N, C, ...) with torch.save, safetensors or numpy.save"
        )
    if not data.is_floating_point() or data.dim() < 2 or data.shape[0] == 0:
        raise InvalidOptionError(
            f"calibration file {path} holds a {data.dtype} tensor of shape {list(data.shape)}; it must be floating "
            "point inputs with a batch dimension, shape (N, C, ...) with N >= 1"
        )
    conv = next((m for m in (model.modules() if model is not None else ()) if isinstance(m, _ConvNd)), None)
    if conv is not None and data.dim() >= 3 and data.shape[1] != conv.in_channels:
        raise InvalidOptionError(
            f"calibration file {path} holds inputs of shape {list(data.shape)} with {data.shape[1]} channels, but the "
            f"model's first conv takes {conv.in_channels}; save inputs shaped like the model's, e.g. "
            f"(N, {conv.in_channels}, H, W)"
        )
    return list(data.split(CALIBRATION_CHUNK))
