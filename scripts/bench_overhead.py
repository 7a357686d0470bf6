"""Side-by-side cost of weight standardization: plain convs vs wsconvert vs timm vs var_mean vs the paper's Conv2d.

Every variant starts from the same randomly initialised torchvision ResNet (weights=None) and keeps its
BatchNorm layers (wsconvert runs with gn=None), so the only difference between variants is the conv weight
path. All variants live in ONE process and are timed in interleaved rounds (A B C D E, B C D E A, ...: the order
rotates so that no variant always runs first or after the same neighbour), so slow drifts of the machine
(other load, clock changes) hit every variant alike; the per-round ratio to plain convs is the number to read.

Variants
  plain          torchvision's convs, untouched
  wsconvert      wsconvert.convert_model(model, gn=None): a WeightStandardization parametrization per conv
  wsconvert-recompute  (train only) the same, plus wsconvert.recompute_in_backward(model): W_hat recomputed
                 in backward instead of saved (less memory, one more W_hat per conv per step)
  wsconvert-baked  (eval only) wsconvert.bake() of the trained wsconvert model: plain convs again
  plain-copy     (eval only) a deepcopy of the trained plain model: the same convs with freshly allocated
                 weights, a control showing how much memory placement alone moves a CPU eval forward
  timm           every nn.Conv2d swapped for timm.layers.StdConv2d (the F.batch_norm trick), same eps
  var_mean       a parametrization computing torch.var_mean per filter, as MosaicML Composer's
                 apply_weight_standardization does (reimplemented here)
  paper          a Conv2d subclass following the authors' reference code (Qiao et al., pytorch-classification
                 models/layers.py): chained means, unbiased std + eps (reimplemented here)

Training step: zero_grad(set_to_none) + forward + cross-entropy + backward + SGD(momentum) step.
Eval: model.eval() forward under torch.no_grad().
Peak training memory: bytes in use at the highest point of one training step = persistent state (parameters,
buffers, optimizer state, inputs) + the highest running total of allocations during the step, read from
torch.profiler's allocation events on CPU (exact, independent of the allocator's caching) and from
torch.cuda.max_memory_allocated on CUDA.

Example (the command used for docs/benchmarks.md):
    python scripts/bench_overhead.py --threads 2 --rounds 15 --json docs/data/bench_overhead.json \
        --png docs/img/bench_overhead.png --markdown docs/data/bench_overhead.md
    python scripts/bench_overhead.py --kernels --threads 2 --rounds 15 --markdown docs/data/bench_kernels.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision
from timm.layers import StdConv2d
from torch import Tensor, nn
from torch.nn.utils import parametrize

import wsconvert
from wsconvert import WeightStandardization, bake, convert_model, recompute_in_backward, standardize_weight
from wsconvert.ws.standardize import _filters_as_rows, _standard

EPS = 1e-5
TRAIN_VARIANTS = ("plain", "wsconvert", "wsconvert-recompute", "timm", "var_mean", "paper")
EVAL_VARIANTS = ("plain", "plain-copy", "wsconvert", "wsconvert-baked", "timm", "var_mean", "paper")


@dataclass(frozen=True)
class Config:
    name: str
    arch: str
    batch: int
    size: int


CONFIGS = {
    "r50": Config("resnet50 b8 128x128", "resnet50", 8, 128),
    "r18": Config("resnet18 b16 64x64", "resnet18", 16, 64),
    # Sizes that keep a GPU busy (launch overhead would dominate the CPU configs there).
    "r50-224": Config("resnet50 b64 224x224", "resnet50", 64, 224),
    "r18-224": Config("resnet18 b128 224x224", "resnet18", 128, 224),
}


# --------------------------------------------------------------------------------------------- the variants
class VarMeanStandardization(nn.Module):
    """Composer-style WS parametrization: biased var_mean over each filter, eps inside the sqrt."""

    def forward(self, weight: Tensor) -> Tensor:
        dims = tuple(range(1, weight.dim()))
        var, mean = torch.var_mean(weight, dim=dims, keepdim=True, correction=0)
        return (weight - mean) / torch.sqrt(var + EPS)


def paper_standardize(w: Tensor) -> Tensor:
    """The authors' reference formula: mean by chained means, unbiased std of the centred filter, + eps."""
    mean = w.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
    centred = w - mean
    # the original uses .view here, which fails on channels_last weights; reshape computes the same numbers
    std = centred.reshape(centred.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + EPS
    return centred / std


class PaperConv2d(nn.Conv2d):
    """The authors' reference Conv2d (pytorch-classification models/layers.py), reimplemented."""

    def forward(self, x: Tensor) -> Tensor:
        w = paper_standardize(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class AnalyticStandardize(torch.autograd.Function):
    """(W - mean) * rstd per row, with a hand-written backward (the candidate custom autograd Function).

    For y = (x - mean) * rstd over a row of n elements: dx = rstd * (g - mean(g) - y * mean(g * y)).
    """

    @staticmethod
    def forward(ctx, rows: Tensor) -> Tensor:  # noqa: ANN001
        var, mean = torch.var_mean(rows, 1, correction=0, keepdim=True)
        rstd = (var + EPS).rsqrt_()
        out = (rows - mean).mul_(rstd)
        ctx.save_for_backward(out, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        out, rstd = ctx.saved_tensors
        g_mean = grad.mean(1, keepdim=True)
        gy_mean = (grad * out).mean(1, keepdim=True)
        return (grad - g_mean - out * gy_mean).mul_(rstd)


def _row_view_path(w: Tensor) -> Tensor:
    """How wsconvert computed the "standard" style before the one-call fast path (commit 7d3801a)."""
    rows, restore = _filters_as_rows(w, False, 1)
    return restore(_standard(rows, EPS))


KERNELS: dict[str, Callable[[Tensor], Tensor]] = {
    "wsconvert: F.layer_norm": lambda w: standardize_weight(w, EPS),
    "wsconvert before the fast path (row view, layer_norm, view back)": lambda w: _row_view_path(w),
    "timm: F.batch_norm trick": lambda w: F.batch_norm(
        w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=EPS
    ).reshape_as(w),
    "Composer style: var_mean": lambda w: VarMeanStandardization()(w),
    "paper: chained means, std + eps": paper_standardize,
    "custom autograd.Function": lambda w: AnalyticStandardize.apply(w.reshape(w.shape[0], -1)).view_as(w),
}


def kernel_benchmark(config: Config, rounds: int) -> str:
    """WS alone over every conv weight of the model: forward + backward, and no-grad forward."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, config.arch)(weights=None)
    weights = [m.weight.detach().clone().requires_grad_(True) for m in model.modules() if isinstance(m, nn.Conv2d)]
    grads = [torch.randn_like(w) for w in weights]
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for name, fn in KERNELS.items():
            start = time.perf_counter()
            torch.autograd.backward([fn(w) for w in weights], grads)
            times.setdefault((name, "forward + backward"), []).append(time.perf_counter() - start)
            with torch.no_grad():
                start = time.perf_counter()
                [fn(w) for w in weights]
                times.setdefault((name, "forward, no grad"), []).append(time.perf_counter() - start)
    count = sum(w.numel() for w in weights)
    lines = [
        f"WS alone on the {len(weights)} conv weights of {config.arch} ({count / 1e6:.1f} M values), "
        f"{torch.get_num_threads()} threads, median of {rounds} interleaved rounds:",
        "",
        "| implementation | forward + backward ms | forward (no grad) ms |",
        "|---|---:|---:|",
    ]
    for name in KERNELS:
        both = 1e3 * statistics.median(times[(name, "forward + backward")])
        fwd = 1e3 * statistics.median(times[(name, "forward, no grad")])
        lines.append(f"| {name} | {both:.1f} | {fwd:.1f} |")
    return "\n".join(lines) + "\n"


def _swap_convs(model: nn.Module, make: Callable[[nn.Conv2d], nn.Conv2d]) -> nn.Module:
    for name, child in list(model.named_children()):
        if type(child) is nn.Conv2d:
            new = make(child)
            with torch.no_grad():
                new.weight.copy_(child.weight)
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            setattr(model, name, new)
        else:
            _swap_convs(child, make)
    return model


def _conv_args(conv: nn.Conv2d) -> dict:
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


def _make_timm(conv: nn.Conv2d) -> nn.Conv2d:
    return StdConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, bias=conv.bias is not None, eps=EPS, **_conv_args(conv)
    )


def _make_paper(conv: nn.Conv2d) -> nn.Conv2d:
    return PaperConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, bias=conv.bias is not None, **_conv_args(conv)
    )


def _var_mean(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if type(module) is nn.Conv2d:
            parametrize.register_parametrization(module, "weight", VarMeanStandardization())
    return model


def _recomputing(model: nn.Module) -> nn.Module:
    model = convert_model(model, gn=None, eps=EPS, inplace=True)
    recompute_in_backward(model)
    return model


def build_variants(
    config: Config, device: torch.device, channels_last: bool, names: tuple[str, ...]
) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = getattr(torchvision.models, config.arch)(weights=None)
    makers: dict[str, Callable[[nn.Module], nn.Module]] = {
        "plain": lambda m: m,
        "wsconvert": lambda m: convert_model(m, gn=None, eps=EPS, inplace=True),
        "wsconvert-recompute": _recomputing,
        "timm": lambda m: _swap_convs(m, _make_timm),
        "var_mean": _var_mean,
        "paper": lambda m: _swap_convs(m, _make_paper),
    }
    variants = {}
    for name, make in makers.items():
        if name not in names:
            continue
        model = make(copy.deepcopy(base)).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        variants[name] = model
    return variants


# ---------------------------------------------------------------------------------------------- measuring
@dataclass
class Runner:
    model: nn.Module
    fn: Callable[[Tensor], Tensor]
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], contextlib.AbstractContextManager]

    def train_step(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(self.fn(x), y)
        loss.backward()
        self.optimizer.step()

    def eval_step(self, x: Tensor) -> Tensor:
        with torch.no_grad(), self.autocast():
            return self.fn(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _storage_bytes(tensors: list[Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and isinstance(t, Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _persistent_bytes(runner: Runner, x: Tensor, y: Tensor) -> int:
    tensors = [*runner.model.parameters(), *runner.model.buffers(), x, y]
    for state in runner.optimizer.state.values():
        tensors.extend(v for v in state.values() if isinstance(v, Tensor))
    tensors.extend(p.grad for p in runner.model.parameters() if p.grad is not None)
    return _storage_bytes(tensors)


def peak_train_memory(runner: Runner, x: Tensor, y: Tensor, device: torch.device) -> int:
    """Highest number of bytes in use during one training step (see the module docstring)."""
    for module in runner.model.modules():
        if isinstance(module, WeightStandardization):
            module.clear_cache()
    runner.optimizer.zero_grad(set_to_none=True)
    baseline = _persistent_bytes(runner, x, y)
    if device.type == "cuda":
        _sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.train_step(x, y)
        _sync(device)
        return baseline + torch.cuda.max_memory_allocated(device) - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.train_step(x, y)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append(event)
    events.sort(key=lambda e: e.start_time_ns)
    running = peak = 0
    for event in events:
        running += event.extra_fields.alloc_size
        peak = max(peak, running)
    return baseline + peak


def weight_read_ms(
    model: nn.Module, x: Tensor, autocast: Callable[[], contextlib.AbstractContextManager], forwards: int
) -> float:
    """Milliseconds per eval forward (no_grad) spent reading ``conv.weight``, timed inside the real forward.

    Each Conv2d instance gets a forward that times its ``self.weight`` read, then runs the usual conv: the
    read runs with the caches as the forward leaves them (a warm loop of reads would be several times
    faster). For a converted model this is the whole per-forward cost of the parametrization; the rest of
    the forward is the same convs. Host time only (on CUDA the kernels run asynchronously meanwhile).
    """
    spent = [0.0]

    def timed_forward(conv: nn.Conv2d, input: Tensor) -> Tensor:
        start = time.perf_counter()
        weight = conv.weight
        spent[0] += time.perf_counter() - start
        return conv._conv_forward(input, weight, conv.bias)

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        conv.forward = types.MethodType(timed_forward, conv)
    try:
        with torch.no_grad(), autocast():
            model(x)
            spent[0] = 0.0
            for _ in range(forwards):
                model(x)
    finally:
        for conv in convs:
            del conv.forward
    return 1e3 * spent[0] / forwards


@dataclass
class Series:
    config: str
    mode: str
    variant: str
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    cpu_ratios: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    weight_read_ms: float | None = None

    def add(self, times: dict[str, tuple[float, float]]) -> None:
        wall, cpu = times[self.variant]
        self.seconds.append(wall)
        self.ratios.append(wall / times["plain"][0])
        self.cpu_seconds.append(cpu)
        self.cpu_ratios.append(cpu / times["plain"][1])

    def summary(self) -> dict:
        out = {
            "config": self.config,
            "mode": self.mode,
            "variant": self.variant,
            "median_ms": 1e3 * statistics.median(self.seconds),
            "ratio_median": statistics.median(self.ratios),
            "ratio_min": min(self.ratios),
            "ratio_max": max(self.ratios),
            "rounds": len(self.seconds),
            "cpu_ratio_median": statistics.median(self.cpu_ratios),
            "cpu_ratio_min": min(self.cpu_ratios),
            "cpu_ratio_max": max(self.cpu_ratios),
            "ratios": self.ratios,
            "cpu_ratios": self.cpu_ratios,
        }
        if self.weight_read_ms is not None:
            out["weight_read_ms"] = self.weight_read_ms
        if self.peak_bytes is not None:
            out["peak_mib"] = self.peak_bytes / 2**20
        return out


def _timed(step: Callable[[], object], device: torch.device, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step. CPU time is what this process used on all its threads:
    unlike wall time it hardly moves when other processes compete for the cores (it still feels shared caches
    and memory bandwidth). On CUDA only the wall time means anything."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps


def run_config(config: Config, args: argparse.Namespace, log: Callable[[str], None]) -> list[Series]:
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(config.batch, 3, config.size, config.size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (config.batch,), device=device)
    amp_dtype = torch.bfloat16 if args.amp else None

    def autocast() -> contextlib.AbstractContextManager:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    def runner(model: nn.Module) -> Runner:
        fn = torch.compile(model) if args.compile else model
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        return Runner(model, fn, optimizer, autocast)

    train_names = tuple(v for v in TRAIN_VARIANTS if v in args.variants)
    eval_names = tuple(v for v in EVAL_VARIANTS if v in args.variants)
    built = build_variants(config, device, args.channels_last, train_names)
    runners = {name: runner(model) for name, model in built.items()}
    results: list[Series] = []

    # Training: warm-up, peak memory, then interleaved timed rounds.
    for r in runners.values():
        r.model.train()
        for _ in range(args.warmup):
            r.train_step(x, y)
    train = {name: Series(config.name, "train", name) for name in train_names}
    if not args.no_memory:
        for name in train_names:
            train[name].peak_bytes = peak_train_memory(runners[name], x, y, device)
    for round_index in range(args.rounds):
        times = {
            name: _timed(lambda r=runners[name]: r.train_step(x, y), device, args.steps)
            for name in _rotated(train_names, round_index)
        }
        for name in train_names:
            train[name].add(times)
        log(f"  {config.name} train round {round_index + 1}: " + _round_line(times))
    results.extend(train.values())

    # Eval: the trained wsconvert model, and its baked copy (checked bitwise against it).
    for r in runners.values():
        r.model.eval()
    runners["plain-copy"] = runner(copy.deepcopy(runners["plain"].model))
    baked = bake(runners["wsconvert"].model)
    runners["wsconvert-baked"] = runner(baked)
    for name in eval_names:
        for _ in range(args.warmup):
            runners[name].eval_step(x)
    # Eager modules, also under --compile: a compiled graph may compute W_hat with its own fused kernel.
    with torch.no_grad(), autocast():
        bitwise = torch.equal(runners["wsconvert"].model(x), baked(x))
    log(f"  {config.name}: baked outputs bitwise equal to the parametrized model in eval: {bitwise}")
    evals = {name: Series(config.name, "eval", name) for name in eval_names}
    for round_index in range(args.rounds):
        times = {
            name: _timed(lambda r=runners[name]: r.eval_step(x), device, args.steps)
            for name in _rotated(eval_names, round_index)
        }
        for name in eval_names:
            evals[name].add(times)
        log(f"  {config.name} eval round {round_index + 1}: " + _round_line(times))
    for name in ("plain", "wsconvert"):
        evals[name].weight_read_ms = weight_read_ms(runners[name].model, x, autocast, forwards=args.rounds)
    results.extend(evals.values())
    for series in results:
        series.bitwise_baked = bitwise  # type: ignore[attr-defined]
    return results


def _rotated(names: tuple[str, ...], round_index: int) -> tuple[str, ...]:
    """A B C D E, then B C D E A, ...: every variant runs at every position equally often (running right
    after a given variant, or first in a round, measurably changes the time on a CPU)."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def _round_line(times: dict[str, tuple[float, float]]) -> str:
    return " ".join(f"{name}={1e3 * wall:.1f}ms(cpu {1e3 * cpu:.1f})" for name, (wall, cpu) in times.items())


# ------------------------------------------------------------------------------------------------ output
def machine_info(args: argparse.Namespace, load_before: tuple[float, ...]) -> dict:
    device = torch.device(args.device)
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": __import__("timm").__version__,
        "wsconvert": wsconvert.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "compile": args.compile,
        "channels_last": args.channels_last,
        "amp": "bf16 autocast" if args.amp else "off (fp32)",
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "loadavg_1min_before": load_before[0],
        "loadavg_1min_after": os.getloadavg()[0],
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    }
    return info


def markdown(summaries: list[dict], info: dict) -> str:
    lines = [
        f"Command: `{info['command']}`  ",
        f"Machine: {info['device_name']}, {info['cpu_count']} CPUs, {info['threads']} torch threads, "
        f"device `{info['device']}`; torch {info['torch']}, torchvision {info['torchvision']}, timm {info['timm']}; "
        f"compile={info['compile']}, channels_last={info['channels_last']}, amp={info['amp']}; "
        f"{info['rounds']} interleaved rounds x {info['steps_per_round']} step(s); "
        f"1-min load average {info['loadavg_1min_before']:.2f} before, {info['loadavg_1min_after']:.2f} after.",
        "",
        "| config | mode | variant | median ms | wall-time ratio to plain: median (min - max) "
        "| CPU-time ratio: median (min - max) | peak train MiB | memory ratio |",
        "|---|---|---|---:|---|---|---:|---:|",
    ]
    plain_peak = {(s["config"], s["mode"]): s.get("peak_mib") for s in summaries if s["variant"] == "plain"}
    for s in summaries:
        peak = s.get("peak_mib")
        base = plain_peak.get((s["config"], s["mode"]))
        mem = f"{peak:.0f}" if peak is not None else ""
        mem_ratio = f"{peak / base:.3f}" if peak is not None and base else ""
        lines.append(
            f"| {s['config']} | {s['mode']} | {s['variant']} | {s['median_ms']:.1f} | "
            f"{s['ratio_median']:.3f} ({s['ratio_min']:.3f} - {s['ratio_max']:.3f}) | "
            f"{s['cpu_ratio_median']:.3f} ({s['cpu_ratio_min']:.3f} - {s['cpu_ratio_max']:.3f}) | {mem} | {mem_ratio} |"
        )
    lines.extend(["", *targets(summaries)])
    return "\n".join(lines) + "\n"


def _per_round(summaries: list[dict], config: str, mode: str, a: str, b: str, key: str) -> list[float]:
    """Per-round time ratio of variant a to variant b (from their per-round ratios to plain)."""
    find = {s["variant"]: s for s in summaries if s["config"] == config and s["mode"] == mode}
    return [x / y for x, y in zip(find[a][key], find[b][key], strict=True)]


def targets(summaries: list[dict]) -> list[str]:
    """The issue's targets, checked against this run (wall time; CPU time in brackets)."""
    lines = ["Targets (issue 5), this run: wall time, CPU time in brackets:", ""]
    for config in dict.fromkeys(s["config"] for s in summaries):
        get = {(s["mode"], s["variant"]): s for s in summaries if s["config"] == config}

        def both(values: tuple[list[float], list[float]]) -> str:
            wall, cpu = (statistics.median(v) for v in values)
            return f"{wall:.3f} [{cpu:.3f}]"

        def versus(mode: str, a: str, b: str, config: str = config) -> str:
            return both(tuple(_per_round(summaries, config, mode, a, b, k) for k in ("ratios", "cpu_ratios")))

        train = get[("train", "wsconvert")]
        line = f"- {config}: training step wsconvert / plain {both((train['ratios'], train['cpu_ratios']))}"
        if ("train", "timm") in get:
            line += (
                f"; wsconvert / timm StdConv2d (ratio of ratios, target <= 1.03) {versus('train', 'wsconvert', 'timm')}"
            )
        lines.append(line)
        if ("train", "wsconvert-recompute") in get:
            s = get[("train", "wsconvert-recompute")]
            lines.append(
                f"- {config}: training step wsconvert-recompute / plain {both((s['ratios'], s['cpu_ratios']))}"
            )
        for variant, target in (("wsconvert", "<= 1.01"), ("wsconvert-baked", "1.00"), ("plain-copy", "control")):
            if ("eval", variant) in get:
                s = get[("eval", variant)]
                lines.append(
                    f"- {config}: eval {variant} / plain (target {target}) {both((s['ratios'], s['cpu_ratios']))}"
                )
        if ("eval", "wsconvert-baked") in get:
            lines.append(
                f"- {config}: eval wsconvert / wsconvert-baked {versus('eval', 'wsconvert', 'wsconvert-baked')}"
            )
        reads = get[("eval", "wsconvert")].get("weight_read_ms"), get[("eval", "plain")].get("weight_read_ms")
        if None not in reads:
            plain_ms = get[("eval", "plain")]["median_ms"]
            lines.append(
                f"- {config}: conv weight reads inside an eval forward: wsconvert {reads[0]:.3f} ms, plain "
                f"{reads[1]:.3f} ms; the difference is {100 * (reads[0] - reads[1]) / plain_ms:.2f} % of the plain "
                f"forward ({plain_ms:.1f} ms)"
            )
        if "peak_mib" in train:
            plain_peak = get[("train", "plain")]["peak_mib"]
            memory = [f"wsconvert {train['peak_mib'] / plain_peak:.3f}"]
            for variant in ("wsconvert-recompute", "timm"):
                if ("train", variant) in get:
                    memory.append(f"{variant} {get[('train', variant)]['peak_mib'] / plain_peak:.3f}")
            lines.append(f"- {config}: peak training memory / plain (target <= 1.05): " + ", ".join(memory))
        lines.append(
            f"- {config}: baked model outputs bitwise equal to the parametrized model in eval: "
            f"**{train['bitwise_baked']}**"
        )
    return lines


def chart(summaries: list[dict], info: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((s["config"], s["mode"]) for s in summaries))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (config, mode) in zip(axes[0], panels, strict=True):
        rows = [s for s in summaries if s["config"] == config and s["mode"] == mode]
        names = [s["variant"] for s in rows]
        med = [s["ratio_median"] for s in rows]
        low = [s["ratio_median"] - s["ratio_min"] for s in rows]
        high = [s["ratio_max"] - s["ratio_median"] for s in rows]
        colours = [
            "#888888" if n.startswith("plain") else "#1f77b4" if n.startswith("wsconvert") else "#ff7f0e" for n in names
        ]
        ax.bar(range(len(rows)), med, yerr=[low, high], color=colours, capsize=3, label="wall time (min-max)")
        ax.plot(range(len(rows)), [s["cpu_ratio_median"] for s in rows], "k.", label="CPU time (median)")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{config}\n{mode}", fontsize=9)
        ax.set_ylabel("time / plain (median, min-max)")
        top = max(max(s["ratio_max"], s["cpu_ratio_median"]) for s in rows)
        ax.set_ylim(0.8, max(1.1, top * 1.05))
        ax.legend(fontsize=7, loc="upper left")
        for i, value in enumerate(med):
            ax.text(i, 0.81, f"{value:.2f}", ha="center", va="bottom", fontsize=7, color="white", weight="bold")
    fig.suptitle(
        f"Weight standardization overhead - {info['device_name']}, {info['threads']} threads, torch {info['torch']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--steps", type=int, default=1, help="steps per variant per round (default 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--configs", default="r50,r18", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument(
        "--variants",
        default=",".join(dict.fromkeys(TRAIN_VARIANTS + EVAL_VARIANTS)),
        help="comma-separated subset (default all; plain and wsconvert are always run)",
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up step: to check the script")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak training memory measurement")
    parser.add_argument("--kernels", action="store_true", help="only time the WS implementations on the weights")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--png", help="write the bar chart here (needs matplotlib)")
    parser.add_argument("--markdown", help="write the docs-ready markdown table here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 3, 1
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown or args.rounds < 1 or args.steps < 1:
        parser.error(f"bad --configs {unknown} (choose from {sorted(CONFIGS)}) or --rounds/--steps < 1")
    known = set(TRAIN_VARIANTS + EVAL_VARIANTS)
    variants = {"plain", "wsconvert", *(v for v in args.variants.split(",") if v)}
    if variants - known:
        parser.error(f"unknown --variants {sorted(variants - known)}; choose from {sorted(known)}")
    args.variants = tuple(variants)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    if args.kernels:
        text = "\n".join(kernel_benchmark(CONFIGS[key], args.rounds) for key in args.configs.split(","))
        info = machine_info(args, load_before)
        text = (
            f"Command: `{info['command']}`; torch {info['torch']}, {info['cpu_count']} CPUs; 1-min load average "
            f"{info['loadavg_1min_before']:.2f} before, {info['loadavg_1min_after']:.2f} after.\n\n{text}"
        )
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as handle:
                handle.write(text)
        return 0
    summaries: list[dict] = []
    for key in args.configs.split(","):
        config = CONFIGS[key]
        print(f"{config.name}: building variants", file=sys.stderr, flush=True)
        for series in run_config(config, args, lambda line: print(line, file=sys.stderr, flush=True)):
            summary = series.summary()
            summary["bitwise_baked"] = series.bitwise_baked  # type: ignore[attr-defined]
            summaries.append(summary)
    info = machine_info(args, load_before)
    table = markdown(summaries, info)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "results": summaries}, handle, indent=2)
    if args.png:
        chart(summaries, info, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
