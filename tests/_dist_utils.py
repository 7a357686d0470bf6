"""One spawned gloo process group on 127.0.0.1 that runs several distributed checks in a row.

Starting processes and a process group costs seconds on a small machine, so the distributed tests share one:
``run_jobs`` spawns ``world_size`` processes once, each runs every job in order, and each job's per-rank
result (a dict of tensors, or the traceback if it raised) comes back to the parent through ``torch.save``.
Jobs must be module-level functions (spawn pickles them by reference). A job that fails on one rank makes
the other ranks' collectives time out after ``COLLECTIVE_TIMEOUT`` instead of hanging the test run.
"""

from __future__ import annotations

import datetime
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Job = Callable[[int, int, Path], dict[str, Any]]

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=180)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _result_path(workdir: Path, job: str, rank: int) -> Path:
    return workdir / f"{job}.rank{rank}.pt"


def _worker(rank: int, world_size: int, port: int, jobs: list[tuple[str, Job]], workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        for name, job in jobs:
            start = time.perf_counter()
            try:
                torch.manual_seed(0)
                result: dict[str, Any] = {"ok": job(rank, world_size, Path(workdir))}
            except Exception:  # reported to the parent test, which fails with this traceback
                result = {"error": traceback.format_exc()}
            result["seconds"] = time.perf_counter() - start
            torch.save(result, _result_path(Path(workdir), name, rank))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_jobs(jobs: dict[str, Job], workdir: Path, world_size: int = 2) -> dict[str, list[dict[str, Any]]]:
    """Run every job on every rank of one spawned gloo group; return ``{job: [result of rank 0, rank 1, ...]}``.

    A result is ``{"ok": <what the job returned>}`` or ``{"error": <traceback text>}``, plus ``"seconds"``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world_size, free_port(), list(jobs.items()), str(workdir)), nprocs=world_size, join=True)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in jobs:
        out[name] = []
        for rank in range(world_size):
            path = _result_path(workdir, name, rank)
            missing = {"error": f"rank {rank} wrote no result for {name}"}
            out[name].append(torch.load(path, weights_only=False) if path.exists() else missing)
    return out


def ok(results: list[dict[str, Any]]) -> list[Any]:
    """The per-rank job outputs; fails the calling test with the worker's traceback if a rank raised."""
    errors = [f"rank {rank}:\n{r['error']}" for rank, r in enumerate(results) if "error" in r]
    if errors:
        raise AssertionError("distributed job failed\n" + "\n".join(errors))
    return [r["ok"] for r in results]
