"""How long convert_model takes on big models: timm regnety_320 and torchvision resnet152 (random weights).

Each model is built once (weights=None / pretrained=False). For every measurement a fresh unconverted copy is
made untimed, then the call is timed:

  plan_conversion            plan + report only, the model is not touched
  convert_model inplace=True     the conversion itself (no deepcopy)
  convert_model inplace=False    the default: deepcopy of the model + conversion
  copy.deepcopy              the deepcopy alone, for reference

for gn=None (BatchNorm kept) and gn=32 (BatchNorm -> GroupNorm). Median and min over --repeats.

    python scripts/bench_convert.py --threads 2 --repeats 5 --json docs/data/bench_convert.json \
        --markdown docs/data/bench_convert.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import timm
import torch
import torchvision
from torch import nn

from wsconvert import convert_model, plan_conversion

MODELS: dict[str, Callable[[], nn.Module]] = {
    "timm regnety_320": lambda: timm.create_model("regnety_320", pretrained=False),
    "torchvision resnet152": lambda: torchvision.models.resnet152(weights=None),
}


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(base: nn.Module, gn: int | None, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {
        "plan_conversion": [],
        "convert_model inplace=True": [],
        "convert_model inplace=False": [],
        "copy.deepcopy": [],
    }
    for _ in range(repeats):
        times["plan_conversion"].append(_time(lambda: plan_conversion(base, gn=gn)))
        fresh = copy.deepcopy(base)
        times["convert_model inplace=True"].append(_time(lambda m=fresh: convert_model(m, gn=gn, inplace=True)))
        del fresh
        times["convert_model inplace=False"].append(_time(lambda: convert_model(base, gn=gn)))
        times["copy.deepcopy"].append(_time(lambda: copy.deepcopy(base)))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--markdown", help="write the docs-ready markdown table here")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    if args.repeats < 1 or any(n not in MODELS for n in names):
        parser.error(f"--repeats must be >= 1 and --models from {list(MODELS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = []
    for name in names:
        torch.manual_seed(0)
        base = MODELS[name]()
        params = sum(p.numel() for p in base.parameters())
        convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in base.modules())
        for gn in (None, 32):
            for what, values in measure(base, gn, args.repeats).items():
                row = {
                    "model": name,
                    "params_m": params / 1e6,
                    "convs": convs,
                    "gn": gn,
                    "what": what,
                    "median_s": statistics.median(values),
                    "min_s": min(values),
                }
                rows.append(row)
                print(
                    f"{name} gn={gn} {what}: median {row['median_s']:.3f} s, min {row['min_s']:.3f} s", file=sys.stderr
                )
        del base
    info = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    }
    lines = [
        f"Command: `{info['command']}`  ",
        f"Machine: {info['cpu_count']} CPUs, {info['threads']} torch threads; torch {info['torch']}, "
        f"torchvision {info['torchvision']}, timm {info['timm']}; {args.repeats} repeats; 1-min load average "
        f"{info['loadavg_1min_before']:.2f} before, {info['loadavg_1min_after']:.2f} after.",
        "",
        "| model | params | convs | gn | what | median s | min s |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params_m']:.1f} M | {r['convs']} | {r['gn']} | {r['what']} | "
            f"{r['median_s']:.3f} | {r['min_s']:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "results": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
