"""Benchmark: convert a synthetic checkpoint of >= 1 GB with the ``wsconvert`` command.

Reports wall time and peak resident memory (ru_maxrss of the child process, from os.wait4) of

- ``plain``: ``torch.load(path, weights_only=True)`` + ``torch.save`` of the same file (the baseline),
- ``wsconvert``: ``python -m wsconvert big.pt --arch bench_checkpoint:wide_convnet --gn 32``,
- ``wsconvert --bake``: the same with baked weights (new tensors for every conv weight),
- ``import torch``: the interpreter with torch imported, nothing else (the fixed cost of every case),

each in a fresh subprocess, rounds interleaved. Target (issue 3): wsconvert's peak RSS <= 1.5 x file size
+ 300 MB. Peak RSS counts the file pages the process maps and touches (mmap=True) as resident.

    .venv/bin/python scripts/bench_checkpoint.py --size-gb 1.1 --rounds 2 --dir /tmp/wsbench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
WIDTH = 1024


def wide_convnet(blocks: int = 29, width: int = WIDTH) -> nn.Module:
    """``blocks`` x (3x3 conv width->width, BatchNorm, ReLU): 9.4M parameters (37.7 MB fp32) per block."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False)]
    for _ in range(blocks):
        layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(*layers)


def blocks_for(size_gb: float) -> int:
    per_block = (WIDTH * WIDTH * 9 + 4 * WIDTH) * 4
    return max(1, math.ceil(size_gb * 1e9 / per_block))


def _make(path: Path, blocks: int) -> None:
    torch.manual_seed(0)
    torch.save(wide_convnet(blocks).state_dict(), path)


def _plain(source: Path, target: Path) -> None:
    state_dict = torch.load(source, weights_only=True)
    torch.save(state_dict, target)


def _import_only() -> None:
    """Nothing beyond ``import torch`` (done at the top of this script): the shared fixed cost."""


def _measure(argv: list[str], env: dict[str, str]) -> dict:
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({process.returncode}): {stderr.strip()}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/wsconvert-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.child:  # inside a measured subprocess
        kind, *rest = args.child
        {"make": lambda: _make(Path(rest[0]), int(rest[1])), "plain": lambda: _plain(Path(rest[0]), Path(rest[1])),
         "import": _import_only}[kind]()  # fmt: skip
        return

    args.dir.mkdir(parents=True, exist_ok=True)
    source = args.dir / "big.pt"
    blocks = blocks_for(args.size_gb)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    me = [sys.executable, str(Path(__file__).resolve())]
    if not source.exists():
        print(f"writing a {blocks}-block synthetic checkpoint to {source} ...", file=sys.stderr)
        _measure([*me, "--child", "make", str(source), str(blocks)], env)
    size_mb = source.stat().st_size / 2**20
    arch = ["--arch", "bench_checkpoint:wide_convnet", "--arch-kwargs", json.dumps({"blocks": blocks})]
    wsconvert = [sys.executable, "-m", "wsconvert", str(source), *arch, "--gn", "32", "--force"]
    cases = {
        "import torch": [*me, "--child", "import"],
        "plain": [*me, "--child", "plain", str(source), str(args.dir / "plain.pt")],
        "wsconvert": [*wsconvert, "-o", str(args.dir / "ws.pt")],
        "wsconvert --bake": [*wsconvert, "--bake", "-o", str(args.dir / "baked.pt")],
    }
    results: dict[str, list[dict]] = {name: [] for name in cases}
    for round_ in range(args.rounds):
        for name, argv in cases.items():
            results[name].append(_measure(argv, env))
            print(f"round {round_ + 1} {name}: {results[name][-1]}", file=sys.stderr)
    summary = {
        "file_mb": round(size_mb, 1),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "target_peak_rss_mb": round(1.5 * size_mb + 300, 1),
        "note": "peak_rss_above_import_mb = peak RSS minus the 'import torch' case's peak",
        "cases": {
            name: {
                "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 2),
                "peak_rss_mb_max": round(max(r["peak_rss_mb"] for r in runs), 1),
                "peak_rss_above_import_mb": round(
                    max(r["peak_rss_mb"] for r in runs) - max(r["peak_rss_mb"] for r in results["import torch"]), 1
                ),
            }
            for name, runs in results.items()
        },
    }
    print(json.dumps(summary, indent=2))
    for name in ("plain.pt", "ws.pt", "baked.pt"):
        (args.dir / name).unlink(missing_ok=True)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
