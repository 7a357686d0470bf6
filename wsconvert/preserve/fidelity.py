"""How closely a converted model reproduces the original on given inputs (``report.fidelity``).

End to end: the largest absolute and the relative (Frobenius) error of the outputs, the mean per-sample cosine,
and for classification-shaped outputs (N, K) the top-1 agreement. Per layer: the relative error
||y_converted - y_original|| / ||y_original|| of every normalization layer's output (before any activation
fused into the module), the layers paired by their dotted path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .calibrate import eval_mode, norm_output, run_model

__all__ = ["Fidelity", "LayerFidelity", "measure_fidelity"]


@dataclass(frozen=True)
class LayerFidelity:
    path: str
    type: str  # the layer in the converted model, e.g. "GroupNorm"
    method: str  # how its affine was set: "calibrated", "data-free", or "kept" (not replaced)
    relative_error: float


@dataclass
class Fidelity:
    """End-to-end and per-layer agreement of the converted model with the original on the calibration data."""

    samples: int
    max_abs_error: float
    relative_error: float
    cosine: float
    top1_agreement: float | None  # fraction of samples with the same argmax; None unless outputs are (N, K)
    layers: list[LayerFidelity] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        top1 = "n/a" if self.top1_agreement is None else f"{100 * self.top1_agreement:.1f} %"
        out = [
            f"Fidelity on the calibration data ({self.samples} samples): top-1 agreement {top1}, "
            f"max |error| {self.max_abs_error:.3g}, relative error {self.relative_error:.3g}, cosine {self.cosine:.6f}"
        ]
        if self.layers:
            width = max(len(layer.path or "<model>") for layer in self.layers)
            out.append(f"  {'layer'.ljust(width)}  method      relative error")
            out += [
                f"  {(layer.path or '<model>').ljust(width)}  {layer.method.ljust(10)}  {layer.relative_error:.3g}"
                for layer in self.layers
            ]
        return out


def _norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, nn.GroupNorm) or isinstance(getattr(m, "running_mean", None), Tensor)
    }


def _flat(output: object) -> list[Tensor]:
    leaves = [t for t in tree_leaves(output) if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError("the model output holds no tensor")
    return leaves


def measure_fidelity(
    original: nn.Module,
    converted: nn.Module,
    batches: list[Tensor] | Tensor,
    *,
    methods: Mapping[str, str] | None = None,
) -> Fidelity:
    """Compare ``converted`` with ``original`` on ``batches`` (eval mode, no gradients, each model's device).

    ``methods`` names how each replaced layer's affine was set (path -> "calibrated" / "data-free"); other
    paired norm layers are reported as "kept".
    """
    batches = [batches] if isinstance(batches, Tensor) else list(batches)
    methods = dict(methods or {})
    ours, theirs = _norm_layers(converted), _norm_layers(original)
    paths = [p for p in ours if p in theirs]
    layer_sums = {p: [0.0, 0.0] for p in paths}
    samples, max_abs, diff_sq, ref_sq, cosines, agree, classify = 0, 0.0, 0.0, 0.0, 0.0, 0, True
    with eval_mode(original, converted):
        for index, batch in enumerate(batches):
            captured: dict[str, Tensor] = {}
            handles = [theirs[p].register_forward_pre_hook(_store(captured, p)) for p in paths]
            try:
                want = _flat(run_model(original, batch, index, what="original"))
            finally:
                for h in handles:
                    h.remove()
            handles = [ours[p].register_forward_pre_hook(_compare(captured, layer_sums, p)) for p in paths]
            try:
                got = _flat(run_model(converted, batch, index, what="converted"))
            finally:
                for h in handles:
                    h.remove()
            n = batch.shape[0]
            samples += n
            for a, b in zip(got, want, strict=False):
                a, b = a.detach().double().cpu(), b.detach().double().cpu()
                if a.shape != b.shape:
                    continue
                diff = a - b
                max_abs = max(max_abs, float(diff.abs().max()) if diff.numel() else 0.0)
                diff_sq += float((diff * diff).sum())
                ref_sq += float((b * b).sum())
            a, b = got[0].detach().double().cpu(), want[0].detach().double().cpu()
            if a.shape == b.shape and a.dim() >= 1 and a.shape[0] == n:
                cosines += float(torch.nn.functional.cosine_similarity(a.reshape(n, -1), b.reshape(n, -1), dim=1).sum())
            classify = classify and a.shape == b.shape and a.dim() == 2 and a.shape[0] == n and a.shape[1] > 1
            if classify:
                agree += int((a.argmax(1) == b.argmax(1)).sum())
    layers = [
        LayerFidelity(p, type(ours[p]).__name__, methods.get(p, "kept"), _ratio(*layer_sums[p]))
        for p in paths
        if layer_sums[p][1] > 0
    ]
    return Fidelity(
        samples=samples,
        max_abs_error=max_abs,
        relative_error=_ratio(diff_sq, ref_sq),
        cosine=cosines / samples if samples else 1.0,
        top1_agreement=agree / samples if classify and samples else None,
        layers=layers,
    )


def _ratio(diff_sq: float, ref_sq: float) -> float:
    return (diff_sq / ref_sq) ** 0.5 if ref_sq > 0 else (0.0 if diff_sq == 0 else float("inf"))


def _store(captured: dict, path: str):
    def hook(module: nn.Module, args: tuple) -> None:
        if path not in captured and args and isinstance(args[0], Tensor):
            y = norm_output(module, args[0])
            if y is not None:
                captured[path] = y.detach().clone()

    return hook


def _compare(captured: dict, sums: dict, path: str):
    seen: set[str] = set()

    def hook(module: nn.Module, args: tuple) -> None:
        want = captured.get(path)
        if path in seen or want is None or not args or not isinstance(args[0], Tensor):
            return
        seen.add(path)
        got = norm_output(module, args[0])
        if got is None or got.shape != want.shape:
            return
        diff = (got.double() - want.double()).pow(2).sum()
        sums[path][0] += float(diff)
        sums[path][1] += float(want.double().pow(2).sum())

    return hook
