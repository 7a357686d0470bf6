"""Training-step time of the norm choices wsconvert offers, against the BatchNorm model they come from.

Variants, all from one random-weight torchvision model built once: ``bn`` (the model as it is), ``ws`` (WS,
BatchNorm kept: ``convert_model(m)``), ``ws+gn`` (``gn=32``, the README's examples), ``ws+bcn``
(``gn=32, norm="bcn"``) and ``ws+bcn-est`` (``bcn_estimate=0.01``). Each round times ``--steps`` SGD steps of
every variant, in an order rotated every round (no position bias); the first round is dropped and the
median of the rest reported, wall and process CPU time, with ratios against ``bn`` measured in the same
process. No assertion: numbers only, for docs/benchmarks.md.

    .venv/bin/python scripts/bench_norms.py --threads 2 \
        --markdown docs/data/bench_norms.md --json docs/data/bench_norms.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch
import torchvision
from torch import nn

import wsconvert

VARIANTS = {
    "bn": {},
    "ws": {"gn": None},
    "ws+gn": {"gn": 32},
    "ws+bcn": {"gn": 32, "norm": "bcn"},
    "ws+bcn-est": {"gn": 32, "norm": "bcn", "bcn_estimate": 0.01},
}
CONFIGS = {"r18-b2": ("resnet18", 2, 64), "r18-b16": ("resnet18", 16, 64), "r50-b8": ("resnet50", 8, 128)}


def build(arch: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    return {
        name: copy.deepcopy(base) if name == "bn" else wsconvert.convert_model(base, **options)
        for name, options in VARIANTS.items()
    }


def time_config(arch: str, batch: int, size: int, rounds: int, steps: int) -> dict[str, dict[str, float]]:
    models = build(arch)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for name, m in models.items()}

    def step(name: str) -> None:
        optimizers[name].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(models[name](x), y).backward()
        optimizers[name].step()

    names = list(models)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(rounds + 1):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(name)
            if round_index:  # the first round warms up every variant
                wall[name].append((time.perf_counter() - start) / steps * 1e3)
                cpu[name].append((time.process_time() - cpu_start) / steps * 1e3)
    return {name: {"wall_ms": statistics.median(wall[name]), "cpu_ms": statistics.median(cpu[name])} for name in names}


def markdown(results: dict, info: dict) -> str:
    header = "| config | " + " | ".join(VARIANTS) + " |"
    lines = [header, "|" + "---|" * (len(VARIANTS) + 1)]
    for config, times in results.items():
        base, base_cpu = times["bn"]["wall_ms"], times["bn"]["cpu_ms"]
        cells = [
            f"{t['wall_ms']:.1f} ms ({t['wall_ms'] / base:.2f}x; CPU {t['cpu_ms'] / base_cpu:.2f}x)"
            for t in times.values()
        ]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Median wall time per SGD training step, ratio against `bn` in the same run (CPU: the same ratio of process "
        f"CPU time, steadier on a shared machine); {info['rounds']} rounds of "
        f"{info['steps']} steps, torch {info['torch']}, {info['threads']} threads, {info['cpus']} CPUs, "
        f"load average {info['load_before'][0]:.1f} before and {info['load_after'][0]:.1f} after."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="r18-b2,r18-b16", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "steps": args.steps,
        "load_before": os.getloadavg(),
    }
    results = {}
    for config in args.configs.split(","):
        arch, batch, size = CONFIGS[config]
        results[f"{arch} b{batch} {size}x{size}"] = time_config(arch, batch, size, args.rounds, args.steps)
        print(config, json.dumps(results[f"{arch} b{batch} {size}x{size}"]), flush=True)
    info["load_after"] = os.getloadavg()
    text = markdown(results, info)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
