"""Micro-batch reproduction: BatchNorm vs GroupNorm vs GroupNorm + Weight Standardization on real data.

Reproduces, at small scale, the central claim of Qiao et al. 2019, "Micro-Batch Training with
Batch-Channel Normalization and Weight Standardization" (arXiv:1903.10520): with micro-batches
BatchNorm degrades, GroupNorm does not, and GroupNorm + Weight Standardization (WS) beats GroupNorm.

Data: scikit-learn's digits (8x8 grayscale, 1797 images, ships with scikit-learn; nothing is
downloaded), one fixed stratified train/test split. Model: a small ResNet with BatchNorm, defined here.
Three variants start from the same initial weights for each seed:

- ``bn``:    the model as built (BatchNorm; evaluated with its running statistics, as in the paper);
- ``gn``:    ``wsconvert.convert_model(model, gn=G, exclude=<every conv path>)``: BatchNorm -> GroupNorm
             only, the convs left plain (exclude patterns are exact conv paths, so only the norms match);
- ``gn_ws``: ``wsconvert.convert_model(model, gn=G)``: GroupNorm and WS on every conv.
- ``bcn_ws``: ``wsconvert.convert_model(model, gn=G, norm="bcn")``: Batch-Channel Normalization (the trained
             BatchNorm, then GroupNorm(G) with a per-group affine) and WS, the paper's method;
- ``bcn_est_ws``: the same with ``bcn_estimate=r`` (the BatchNorm part always normalizes with running
             estimates updated at rate r, the authors' EstBN for micro-batches; ``--bcn-estimate``).

Each is trained at every batch size for the same number of epochs (same number of samples seen), with
SGD + momentum and a per-step cosine schedule. Learning rate rule (linear scaling, Goyal et al. 2017,
arXiv:1706.02677): ``lr = base_lr * batch_size / ref_batch`` (``--lr-scaling none`` keeps ``base_lr``).

Writes ``<out>/microbatch.json`` (config, machine, run time, every run's curves, a summary with test
accuracy mean and sample std over seeds) and a PNG of the loss curves. Run
``python scripts/microbatch.py --help`` for the options; ``--quick`` is a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import wsconvert

NORMS = ("bn", "gn", "gn_ws", "bcn_ws", "bcn_est_ws")
NORM_LABELS = {
    "bn": "BatchNorm",
    "gn": "GroupNorm",
    "gn_ws": "GroupNorm + WS",
    "bcn_ws": "BCN + WS",
    "bcn_est_ws": "BCN (est.) + WS",
}
DEFAULT_BCN_ESTIMATE = 0.01


@dataclass
class Config:
    """Every setting of one experiment (all of it is written to the JSON)."""

    seeds: int = 3
    epochs: int = 12
    batch_sizes: tuple[int, ...] = (2, 32)
    width: int = 16
    groups: int = 8
    base_lr: float = 0.1
    ref_batch: int = 32
    lr_scaling: str = "linear"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    test_size: float = 0.25
    split_seed: int = 0
    train_subset: int | None = None
    threads: int = 1
    quick: bool = False
    norms: tuple[str, ...] = field(default=NORMS)
    bcn_estimate: float = DEFAULT_BCN_ESTIMATE

    def lr_for(self, batch_size: int) -> float:
        """Learning rate for ``batch_size``: linear scaling rule, or the base rate unchanged."""
        if self.lr_scaling == "linear":
            return self.base_lr * batch_size / self.ref_batch
        return self.base_lr


# --- data ---------------------------------------------------------------------------------------


def load_digits_split(
    test_size: float = 0.25, split_seed: int = 0, train_subset: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits as (N, 1, 8, 8) float tensors, one fixed stratified split, scaled with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=test_size, random_state=split_seed, stratify=digits.target
    )
    if train_subset is not None:
        x_train, y_train = x_train[:train_subset], y_train[:train_subset]
    x_train = torch.tensor(x_train, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x_test = torch.tensor(x_test, dtype=torch.float32).reshape(-1, 1, 8, 8)
    mean, std = x_train.mean(), x_train.std()
    return (
        (x_train - mean) / std,
        torch.tensor(y_train, dtype=torch.long),
        (x_test - mean) / std,
        torch.tensor(y_test, dtype=torch.long),
    )


# --- model --------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016, arXiv:1512.03385): two 3x3 conv-BN pairs and a shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for 8x8 inputs: stem, three stages of one block (8x8, 4x4, 2x2), global pool, linear."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = BasicBlock(width, width, 1)
        self.stage2 = BasicBlock(width, 2 * width, 2)
        self.stage3 = BasicBlock(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_variant(
    base: nn.Module, norm: str, groups: int, bcn_estimate: float = DEFAULT_BCN_ESTIMATE
) -> tuple[nn.Module, dict | None]:
    """A copy of ``base`` with ``norm`` (one of NORMS) and the wsconvert report (None for "bn")."""
    if norm == "bn":
        return copy.deepcopy(base), None
    if norm == "gn":
        # exclude every conv by its exact path: only the BatchNorm -> GroupNorm swap remains.
        conv_paths = [name for name, module in base.named_modules() if isinstance(module, nn.Conv2d)]
        options = {"gn": groups, "exclude": conv_paths}
    elif norm == "gn_ws":
        options = {"gn": groups}
    elif norm == "bcn_ws":
        options = {"gn": groups, "norm": "bcn"}
    elif norm == "bcn_est_ws":
        options = {"gn": groups, "norm": "bcn", "bcn_estimate": bcn_estimate}
    else:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    report = wsconvert.plan_conversion(base, **options)
    model = wsconvert.convert_model(base, **options)
    _check_variant(model, norm)
    return model, report.summary()


def _check_variant(model: nn.Module, norm: str) -> None:
    """Fail loudly if a variant is not what its name says (guards the comparison itself)."""
    kept = {id(m.bn) for m in model.modules() if isinstance(m, wsconvert.BatchChannelNorm)}
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in kept for m in model.modules()):
        raise RuntimeError(f"{norm}: a BatchNorm layer is left after conversion (outside a BatchChannelNorm)")
    if norm.startswith("bcn") and not kept:
        raise RuntimeError(f"{norm}: no BatchChannelNorm after conversion")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    standardized = [wsconvert.is_standardized(m) for m in convs]
    expected = norm.endswith("_ws")
    if not all(s == expected for s in standardized):
        raise RuntimeError(f"{norm}: {sum(standardized)} of {len(convs)} convs standardized, expected {expected}")


# --- training -----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode: BatchNorm uses its running statistics."""
    model.eval()
    logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(1) == y).float().mean().item()
    return loss, accuracy


def train_one(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    batch_size: int,
    lr: float,
    config: Config,
    seed: int,
) -> dict:
    """Train with SGD + momentum and a per-step cosine schedule; the curves and final test metrics.

    Every batch has exactly ``batch_size`` images (the incomplete last batch of an epoch is dropped, so
    BatchNorm never sees a smaller batch than the one named).
    """
    x_train, y_train, x_test, y_test = data
    n = len(x_train)
    steps_per_epoch = n // batch_size  # the incomplete last batch is dropped: every batch has batch_size images
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {n} training images")
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
    )
    order = torch.Generator().manual_seed(seed)  # same sample order for every norm at this seed
    train_loss, test_loss, test_acc = [], [], []
    start = time.perf_counter()
    for _ in range(config.epochs):
        model.train()
        permutation = torch.randperm(n, generator=order)
        total, count = 0.0, 0
        for step in range(steps_per_epoch):
            index = permutation[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
            count += len(index)
        train_loss.append(total / count)
        loss_value, accuracy = evaluate(model, x_test, y_test)
        test_loss.append(loss_value)
        test_acc.append(accuracy)
    return {
        "train_loss": train_loss,
        "test_loss": test_loss,
        "test_acc_curve": test_acc,
        "test_acc": test_acc[-1],
        "steps": total_steps,
        "seconds": time.perf_counter() - start,
    }


def summarize(runs: Sequence[dict]) -> list[dict]:
    """Test accuracy mean and sample standard deviation (n-1) over seeds, per (norm, batch size)."""
    keys = sorted({(r["norm"], r["batch_size"]) for r in runs}, key=lambda k: (k[1], NORMS.index(k[0])))
    rows = []
    for norm, batch_size in keys:
        accuracies = [r["test_acc"] for r in runs if r["norm"] == norm and r["batch_size"] == batch_size]
        rows.append(
            {
                "norm": norm,
                "batch_size": batch_size,
                "n_seeds": len(accuracies),
                "test_acc_mean": statistics.fmean(accuracies),
                "test_acc_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "test_acc_all": accuracies,
            }
        )
    return rows


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def run(config: Config, log=print) -> dict:
    """Train every (norm, batch size, seed) combination; the full results dict (see the module docstring)."""
    torch.set_num_threads(config.threads)
    data = load_digits_split(config.test_size, config.split_seed, config.train_subset)
    runs, reports = [], {}
    start = time.perf_counter()
    for seed in range(config.seeds):
        torch.manual_seed(seed)
        base = SmallResNet(config.width)  # one initialization per seed, shared by all variants
        for batch_size in config.batch_sizes:
            lr = config.lr_for(batch_size)
            for norm in config.norms:
                model, report = build_variant(base, norm, config.groups, config.bcn_estimate)
                reports[norm] = report
                torch.manual_seed(seed)
                result = train_one(model, data, batch_size, lr, config, seed)
                runs.append({"norm": norm, "batch_size": batch_size, "seed": seed, "lr": lr, **result})
                log(
                    f"seed {seed} batch {batch_size:>3} {NORM_LABELS[norm]:<15} lr {lr:.5f} "
                    f"train loss {result['train_loss'][-1]:.4f} test acc {result['test_acc']:.4f} "
                    f"({result['seconds']:.1f}s)"
                )
    return {
        "config": asdict(config),
        "data": {"dataset": "sklearn.datasets.load_digits", "train": len(data[0]), "test": len(data[2])},
        "conversion_reports": reports,
        "machine": machine_info(),
        "runtime_s": time.perf_counter() - start,
        "runs": runs,
        "summary": summarize(runs),
    }


def plot(results: dict, path: Path) -> None:
    """Train loss and test loss per epoch (mean over seeds, band = min..max), one column per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, runs = results["config"], results["runs"]
    batch_sizes = config["batch_sizes"]
    figure, axes = plt.subplots(2, len(batch_sizes), figsize=(max(6.5, 5 * len(batch_sizes)), 7.5), squeeze=False)
    epochs = range(1, config["epochs"] + 1)
    for column, batch_size in enumerate(batch_sizes):
        for row, key in enumerate(("train_loss", "test_loss")):
            axis = axes[row][column]
            for norm in config["norms"]:
                curves = torch.tensor([r[key] for r in runs if r["norm"] == norm and r["batch_size"] == batch_size])
                if len(curves) == 0:
                    continue
                axis.plot(epochs, curves.mean(0), label=NORM_LABELS[norm])
                axis.fill_between(epochs, curves.min(0).values, curves.max(0).values, alpha=0.2)
            axis.set_yscale("log")
            axis.set_xlabel("epoch")
            axis.set_ylabel("train loss (running, train mode)" if key == "train_loss" else "test loss (eval mode)")
            axis.set_title(f"batch size {batch_size}")
            axis.grid(True, alpha=0.3)
            axis.legend()
    figure.suptitle(
        f"digits, SmallResNet(width={config['width']}), {config['seeds']} seed(s)\n"
        "line: mean, band: min..max over seeds"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, Path, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default 3; 1 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 12; 3 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("microbatch-out"), help="folder for microbatch.json")
    parser.add_argument("--png", type=Path, default=None, help="PNG path (default <out>/microbatch.png)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 training images, width 8, seconds")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default 1; 2 on an idle 2-core machine)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--width", type=int, default=None, help="channels of the first stage (default 16)")
    parser.add_argument("--groups", type=int, default=8, help="GroupNorm groups G (default 8)")
    parser.add_argument("--base-lr", type=float, default=0.1, help="learning rate at --ref-batch (default 0.1)")
    parser.add_argument("--ref-batch", type=int, default=32, help="batch size that gets --base-lr (default 32)")
    parser.add_argument("--lr-scaling", choices=("linear", "none"), default="linear")
    parser.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="use only the first N training images (default all; 256 with --quick)",
    )
    parser.add_argument(
        "--norms", nargs="+", choices=NORMS, default=list(NORMS), help="variants to train (default all)"
    )
    parser.add_argument(
        "--bcn-estimate",
        type=float,
        default=DEFAULT_BCN_ESTIMATE,
        help=f"rate r of the estimated BatchNorm in bcn_est_ws (default {DEFAULT_BCN_ESTIMATE})",
    )
    args = parser.parse_args(argv)
    for name in ("seeds", "epochs", "threads", "width", "groups", "ref_batch", "train_subset"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if any(b < 1 for b in args.batch_sizes):
        parser.error(f"--batch-sizes must all be >= 1, got {args.batch_sizes}")
    if args.base_lr <= 0:
        parser.error(f"--base-lr must be > 0, got {args.base_lr}")
    if not 0 < args.bcn_estimate <= 1:
        parser.error(f"--bcn-estimate must be in (0, 1], got {args.bcn_estimate}")
    config = Config(
        seeds=args.seeds or (1 if args.quick else 3),
        epochs=args.epochs or (3 if args.quick else 12),
        batch_sizes=tuple(args.batch_sizes),
        width=args.width or (8 if args.quick else 16),
        groups=args.groups,
        base_lr=args.base_lr,
        ref_batch=args.ref_batch,
        lr_scaling=args.lr_scaling,
        train_subset=args.train_subset or (256 if args.quick else None),
        threads=args.threads,
        quick=args.quick,
        norms=tuple(dict.fromkeys(args.norms)),
        bcn_estimate=args.bcn_estimate,
    )
    return config, args.out, args.png or args.out / "microbatch.png"


def format_table(summary: Sequence[dict]) -> str:
    """The summary as a Markdown table."""
    lines = ["| batch size | norm | test accuracy (mean ± std) | seeds |", "|---|---|---|---|"]
    for row in summary:
        lines.append(
            f"| {row['batch_size']} | {NORM_LABELS[row['norm']]} | "
            f"{100 * row['test_acc_mean']:.2f} ± {100 * row['test_acc_std']:.2f} % | {row['n_seeds']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    config, out, png = parse_args(argv)
    results = run(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "microbatch.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, png)
    print(format_table(results["summary"]))
    print(f"total {results['runtime_s']:.0f}s; wrote {out / 'microbatch.json'} and {png}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
