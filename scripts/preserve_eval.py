"""Evidence for ``preserve=True`` (docs/preserve.md): does the converted model keep what a trained model computes?

A torchvision resnet18 with BatchNorm (3x3 stride-2 first conv for 1-channel 32x32 inputs, max-pool kept) is
trained here, offline, on sklearn's ``load_digits`` (8x8 digits upsampled to 32x32, 80/20 stratified split), for
several seeds. Each trained model is converted at gn = None, 32 and 8 three ways:

- naive: ``convert_model(net, gn=G)``
- data-free: ``convert_model(net, gn=G, preserve=True)``
- calibrated: ``convert_model(net, gn=G, preserve=True, calibration_data=<64 training images>)``

and measured before any fine-tuning on the test split: top-1 agreement with the original model and accuracy.
Then every start at gn = 32 and 8 (and the original BatchNorm model, as a reference) is fine-tuned at batch size 2
for a fixed number of SGD steps, with the test accuracy recorded along the way, at --lr; the gn = 32 starts also
at the lower --low-lr.

Writes docs/data/preserve_eval.json and docs/img/preserve_eval.png. Runs on one CPU thread:
    .venv/bin/python scripts/preserve_eval.py [--seeds 3] [--epochs 5] [--steps 200] [--models DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import wsconvert

ROOT = Path(__file__).resolve().parents[1]
GNS = (None, 32, 8)
METHODS = ("naive", "data-free", "calibrated")


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=data.target, random_state=0)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def resnet18() -> nn.Module:
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 3, stride=2, padding=1, bias=False)
    return net


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(chunk) for chunk in x.split(120)]).argmax(1)


def train(seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    net = resnet18()
    steps = epochs * ((len(x) + 63) // 64)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=generator).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return net.eval()


def convert(net: nn.Module, gn: int | None, method: str, calib: torch.Tensor) -> nn.Module:
    if method == "naive":
        return wsconvert.convert_model(net, gn=gn)
    if method == "data-free":
        return wsconvert.convert_model(net, gn=gn, preserve=True)
    return wsconvert.convert_model(net, gn=gn, preserve=True, calibration_data=calib)


def finetune(model: nn.Module, x, y, xt, yt, steps: int, every: int, seed: int, lr: float) -> list[list[float]]:
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(1000 + seed)
    order = torch.randperm(len(x), generator=generator)
    curve = [[0, float((predict(model, xt) == yt).float().mean())]]
    for step in range(1, steps + 1):
        model.train()
        start = (2 * (step - 1)) % (len(x) - 1)
        idx = order[start : start + 2]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if step % every == 0:
            curve.append([step, float((predict(model, xt) == yt).float().mean())])
    return curve


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = results["seeds"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    width = 0.27
    for gi, gn in enumerate(GNS):
        for mi, method in enumerate(METHODS):
            values = [100 * seeds[s]["before"][str(gn)][method]["agreement"] for s in seeds]
            axes[0].bar(gi + (mi - 1) * width, np.mean(values), width, yerr=np.std(values), capsize=3,
                        color=f"C{mi}", label=method if gi == 0 else None)  # fmt: skip
    axes[0].set_xticks(range(len(GNS)), [f"gn={gn}" for gn in GNS])
    axes[0].set_ylabel("top-1 agreement with the original (%)")
    axes[0].set_ylim(0, 101)
    axes[0].set_title("before fine-tuning (test split, mean ± sd over seeds)")
    axes[0].legend(loc="lower left")
    low = results["setup"]["finetune"]["low_lr"]
    panels = [("finetune", 32, results["setup"]["finetune"]["lr"]), ("finetune", 8, results["setup"]["finetune"]["lr"])]
    panels.append(("finetune_low_lr", 32, low))
    for ax, (key, gn, lr) in zip(axes[1:], panels, strict=True):
        for mi, method in enumerate(("original BN", *METHODS)):
            curves = [seeds[s][key][str(gn)][method] for s in seeds]
            steps = [p[0] for p in curves[0]]
            acc = np.array([[100 * p[1] for p in c] for c in curves])
            color = "gray" if method == "original BN" else f"C{mi - 1}"
            ax.plot(steps, acc.mean(0), marker="o", ms=3, color=color, label=method)
            ax.fill_between(steps, acc.min(0), acc.max(0), color=color, alpha=0.15)
        ax.set_title(f"fine-tuning at batch size 2, lr {lr}, gn={gn}")
        ax.set_xlabel("SGD steps (batch size 2)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 101)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.003, help="fine-tuning learning rate (gn = 32 and 8)")
    parser.add_argument("--low-lr", type=float, default=0.0003, help="the lower fine-tuning learning rate (gn = 32)")
    parser.add_argument("--models", type=Path, default=None, help="folder to keep (and reuse) the trained models")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "data" / "preserve_eval.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "preserve_eval.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y, xt, yt = digits()
    results = {
        "setup": {
            "data": "sklearn load_digits, 8x8 upsampled to 32x32, 80/20 stratified split (random_state=0)",
            "train": len(x), "test": len(xt), "epochs": args.epochs, "calibration_images": args.calibration,
            "finetune": {"batch_size": 2, "steps": args.steps, "optimizer": "SGD momentum 0.9", "lr": args.lr,
                         "low_lr": args.low_lr, "low_lr_gn": [32]},
            "torch": torch.__version__, "wsconvert": wsconvert.__version__,
        },
        "seeds": {},
    }  # fmt: skip
    started = time.time()
    for seed in range(args.seeds):
        cached = args.models / f"resnet18-digits-seed{seed}-e{args.epochs}.pt" if args.models else None
        if cached is not None and cached.exists():
            net = resnet18()
            net.load_state_dict(torch.load(cached, weights_only=True))
            net.eval()
        else:
            net = train(seed, x, y, args.epochs)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(net.state_dict(), cached)
        reference = predict(net, xt)
        entry = {"accuracy": float((reference == yt).float().mean()), "before": {}, "finetune": {}}
        print(f"seed {seed}: original accuracy {100 * entry['accuracy']:.1f} % ({time.time() - started:.0f}s)")
        calib = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: args.calibration]]
        starts = {}
        for gn in GNS:
            entry["before"][str(gn)] = {}
            for method in METHODS:
                t = time.time()
                model = convert(net, gn, method, calib)
                seconds = time.time() - t
                pred = predict(model, xt)
                entry["before"][str(gn)][method] = {
                    "agreement": float((pred == reference).float().mean()),
                    "accuracy": float((pred == yt).float().mean()),
                    "convert_seconds": round(seconds, 2),
                }
                starts[(gn, method)] = model
                print(f"  gn={gn} {method}: {entry['before'][str(gn)][method]}")
        for key, lr, gns in (("finetune", args.lr, (32, 8)), ("finetune_low_lr", args.low_lr, (32,))):
            bn_curve = finetune(net, x, y, xt, yt, args.steps, args.every, seed, lr)
            print(f"  finetune lr {lr} original BN: {[round(100 * a, 1) for _, a in bn_curve]}")
            entry[key] = {}
            for gn in gns:
                entry[key][str(gn)] = {"original BN": bn_curve}
                for method in METHODS:
                    curve = finetune(starts[(gn, method)], x, y, xt, yt, args.steps, args.every, seed, lr)
                    entry[key][str(gn)][method] = curve
                    print(f"  finetune lr {lr} gn={gn} {method}: {[round(100 * a, 1) for _, a in curve]}")
        results["seeds"][str(seed)] = entry
        results["seconds"] = round(time.time() - started)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.plot)
    print(f"wrote {args.out} and {args.plot} in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
