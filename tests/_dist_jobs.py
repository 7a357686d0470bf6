"""The jobs run by the spawned process group of test_integration_distributed.py, and their shared inputs.

Every builder seeds its own generator, so the parent test (single-process reference) and every rank build
bit-identical models and batches without shipping them between processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch.distributed as dist
import torchvision
from torch import nn

import wsconvert

PER_RANK = 2  # images per rank
STEPS = 2  # FSDP2 training steps compared before the first eval (one more follows it)


def resnet18_gn() -> nn.Module:
    """torchvision resnet18 (random init, 10 classes) converted with gn=32: the issue's model."""
    torch.manual_seed(0)
    return wsconvert.convert_model(torchvision.models.resnet18(weights=None, num_classes=10), gn=32)


class WideCNN(nn.Module):
    """Few ops (cheap to compile) but ~2.7 MB of weights, so DDP with bucket_cap_mb=1 makes several buckets.

    A user-defined forward on purpose: inside ``torch.compile(DDP(model))`` dynamo graph-breaks at DDP's
    ``_inside_ddp_forward`` and compiles the wrapped model's forward as a frame of its own, which it does not do
    for a bare ``nn.Sequential`` (torch.nn's own files are not traced as top-level frames).
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
        )
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def wide_cnn() -> nn.Module:
    torch.manual_seed(0)
    return wsconvert.convert_model(WideCNN(), gn=32)


def batches(count: int, world_size: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` global batches of ``PER_RANK * world_size`` images; rank r uses rows [r*PER_RANK, (r+1)*PER_RANK)."""
    gen = torch.Generator().manual_seed(1)
    n = PER_RANK * world_size
    return [
        (torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for _ in range(count)
    ]


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * PER_RANK : (rank + 1) * PER_RANK]


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def ddp_one_step(rank: int, world_size: int, workdir: Path) -> dict[str, Any]:
    """Point 1: converted resnet18, DDP over gloo, one forward/backward; the averaged gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = resnet18_gn()
    ddp = DDP(model)
    ((x, y),) = batches(1, world_size, 32)
    loss = nn.functional.cross_entropy(ddp(shard(x, rank)), shard(y, rank))
    loss.backward()
    return {"grads": _grads(model)}


def _set_cache(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, wsconvert.WeightStandardization):
            module.cache = enabled
            module.clear_cache()


def _eval(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval outputs twice with the WS cache on (the second call reuses it) and once with it off."""
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
        _set_cache(model, False)
        uncached = model(x)
        _set_cache(model, True)
    model.train()
    return {"first": first, "cached": second, "uncached": uncached}


def _fsdp2_steps(model: nn.Module, rank: int, world_size: int, size: int) -> tuple[list, list, dict]:
    """STEPS + 1 SGD steps of a sharded model on its rank's share of each batch: (data, losses averaged over the
    ranks, evals after the last reference step and after one more step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = batches(STEPS + 1, world_size, size)
    losses, evals = [], {}
    for step, (x, y) in enumerate(data):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(shard(x, rank)), shard(y, rank))
        loss.backward()
        optimizer.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, op=dist.ReduceOp.AVG)
        losses.append(global_loss)
        if step >= STEPS - 1:
            evals[f"after_step{step + 1}"] = _eval(model, shard(data[0][0], rank))
    return data, losses, evals


def fsdp2_train(rank: int, world_size: int, workdir: Path) -> dict[str, Any]:
    """Point 2: fully_shard per residual block and at the root; SGD steps; evals; full state dict; load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = resnet18_gn()
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            fully_shard(block)
    fully_shard(model)
    data, losses, evals = _fsdp2_steps(model, rank, world_size, 32)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    initial = resnet18_gn().state_dict()
    set_model_state_dict(model, initial, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    evals["after_load"] = _eval(model, shard(data[0][0], rank))
    return {"losses": torch.stack(losses), "evals": evals, "state_dict": full if rank == 0 else None}


def ddp_compile(
    rank: int, world_size: int, workdir: Path, backend: str = "aot_eager", optimize_ddp: bool = True
) -> dict[str, Any]:
    """Point 3b: torch.compile(DDP(converted model)) with several buckets, i.e. DDPOptimizer graph splitting
    (the setup of pytorch#113415); two SGD steps, the second under error_on_recompile.

    pytorch#113415 fails inside AOTAutograd on the split graphs, which ``aot_eager`` runs in full; inductor's
    code generation for them is slow on a small CPU, so the default run uses aot_eager and a slow test inductor.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    # a compile cache of its own: a warm cache shared with other runs could skip the counting backend below
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(workdir / f"compile-cache-{backend}-{optimize_ddp}-rank{rank}")
    torch._dynamo.reset()
    compile_graph = torch._dynamo.lookup_backend(backend)
    graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        graphs.append(len(gm.graph.nodes))
        return compile_graph(gm, example_inputs)

    buckets: list[int] = []

    class BucketLog(logging.Handler):  # DDPOptimizer logs how many buckets it split the graph into
        def emit(self, record: logging.LogRecord) -> None:
            if "DDPOptimizer used bucket cap" in str(record.msg):
                buckets.append(int(record.args[1]))

    logger = logging.getLogger("torch._dynamo.backends.distributed")
    handler, level = BucketLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    model = wide_cnn()
    ddp = DDP(model, bucket_cap_mb=1)
    compiled = torch.compile(ddp, backend=counting_backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for step, (x, y) in enumerate(batches(2, world_size, 8)):
        optimizer.zero_grad()
        with torch._dynamo.config.patch(error_on_recompile=step > 0, optimize_ddp=optimize_ddp):
            loss = nn.functional.cross_entropy(compiled(shard(x, rank)), shard(y, rank))
        loss.backward()
        grads.append(_grads(model))
        optimizer.step()
    logger.removeHandler(handler)
    logger.setLevel(level)
    return {"grads": grads, "graphs": len(graphs), "buckets": buckets, "optimize_ddp": optimize_ddp}


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    return wsconvert.convert_model(net, gn=4)


def fsdp2_eval_cache(rank: int, world_size: int, workdir: Path) -> dict[str, Any]:
    """The sequence that served stale W_hat before wsconvert.ws.fsdp: under no_grad, eval, update the sharded
    parameters in place (as an EMA or a hand-written update does), eval again; compared with a fresh eval after
    clear_cache()."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_cnn()
    for module in model:
        if isinstance(module, nn.Conv2d):
            fully_shard(module)
    fully_shard(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(rank))
    stale = []
    with torch.no_grad():
        for _ in range(6):
            model(x)
            for param in model.parameters():
                param.add_(param.square())  # not a scale or a shift per filter: W_hat changes
            served = model(x)
            for module in model.modules():
                if isinstance(module, wsconvert.WeightStandardization):
                    module.clear_cache()
            stale.append((served - model(x)).abs().max())
    caches = [m._cached for m in model.modules() if isinstance(m, wsconvert.WeightStandardization)]
    return {"stale": torch.stack(stale), "cache_bypassed": all(c is None for c in caches)}


def wrapped_then_converted(rank: int, world_size: int, workdir: Path) -> dict[str, Any]:
    """The ordering rule: converting a DDP-wrapped or fully_shard-ed model is refused with the way out."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    messages = {}
    for name, wrap in (("ddp", DDP), ("fsdp2", fully_shard)):
        net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
        try:
            wsconvert.convert_model(wrap(net), gn=4)
        except wsconvert.InvalidOptionError as error:
            messages[name] = str(error)
    return {"messages": messages}


DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
DISTRIBUTED_RECIPES = ("ddp", "fsdp2", "compile_ddp")  # run in the process group of test_integration_distributed
_RECIPE = re.compile(r"<!-- recipe: (\w+) -->\n```python\n(.*?)```", re.S)


def bcn_cnn(estimate: float | None, sync: bool) -> nn.Module:
    """A small BatchNorm CNN converted with norm="bcn" (inner SyncBatchNorm when ``sync``), seeded."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    if sync:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return wsconvert.convert_model(model, gn=4, norm="bcn", bcn_estimate=estimate)


def bcn_ddp_step(rank: int, world_size: int, workdir: Path, estimate: float | None, sync: bool) -> dict[str, Any]:
    """Issue 12: a BatchChannelNorm model under DDP over gloo, one training forward/backward per rank."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = bcn_cnn(estimate, sync)
    ddp = DDP(model)
    ((x, y),) = batches(1, world_size, 8)
    out = ddp(shard(x, rank))
    nn.functional.cross_entropy(out, shard(y, rank)).backward()
    return {"out": out.detach(), "grads": _grads(model), "buffers": {k: v.clone() for k, v in model.named_buffers()}}


def doc_recipes() -> dict[str, str]:
    """The python blocks of docs/integrations.md marked ``<!-- recipe: NAME -->``, by name."""
    return dict(_RECIPE.findall(DOC.read_text(encoding="utf-8")))


@contextlib.contextmanager
def quick_compile() -> Iterator[None]:
    """Run recipes' ``torch.compile(model)`` with the aot_eager backend: inductor's C++ code generation for a
    whole resnet18 takes minutes on a small CPU, and test_integration_compile.py covers inductor itself."""
    original = torch.compile

    def compile_aot_eager(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backend", "aot_eager")
        return original(*args, **kwargs)

    torch.compile = compile_aot_eager
    try:
        yield
    finally:
        torch.compile = original


def run_recipe(name: str) -> dict[str, Any]:
    """Execute one recipe of docs/integrations.md in a fresh namespace; return that namespace."""
    namespace: dict[str, Any] = {"__name__": f"recipe_{name}"}
    with quick_compile():
        exec(compile(doc_recipes()[name], f"docs/integrations.md:{name}", "exec"), namespace)
    return namespace


def doc_recipe(rank: int, world_size: int, workdir: Path, name: str) -> dict[str, Any]:
    """A distributed recipe of docs/integrations.md, in this already initialized process group (as torchrun)."""
    torch._dynamo.reset()
    namespace = run_recipe(name)
    params = [p.to_local() if hasattr(p, "to_local") else p for p in namespace["model"].parameters()]
    return {
        "finite": all(bool(torch.isfinite(p).all()) for p in params),
        "grads": sum(p.grad is not None for p in namespace["model"].parameters()),
        "single_loaded": "single" in namespace,
    }


# --- preserve=True (issue 11): Adaptive WS gain/shift buffers under DDP and FSDP2 -----------------------------


class PreserveCNN(nn.Module):
    """Conv (no bias) / strided conv (bias) / ConvTranspose, each followed by BatchNorm, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.up(x)))
        return self.head(x.mean((2, 3)))


def preserve_cnn(seed: int = 0) -> nn.Module:
    """PreserveCNN with trained-looking weights (filters with a mean and a small scale, BatchNorm statistics and
    affines away from 0/1), converted with gn=4, preserve=True: gain/shift far from 1/0, GroupNorm affines set
    from the BatchNorms. ``seed`` gives another model of the same architecture."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = PreserveCNN()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                m.weight.mul_(0.3).add_(0.2 * torch.rand((), generator=gen) - 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.3, 0.3, generator=gen)
    return wsconvert.convert_model(net.eval(), gn=4, preserve=True).train()


def gain_shift(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Adaptive WS buffers of a model, by state-dict key (cloned)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith((".gain", ".shift"))}


def ddp_preserve_step(rank: int, world_size: int, workdir: Path) -> dict[str, Any]:
    """preserve under DDP: rank 1 starts with other gain/shift (and weights), DDP broadcasts rank 0's at wrap
    time; one SGD step on each rank's half of the batch; grads, updated state, eval outputs (WS eval cache)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = preserve_cnn()
    if rank != 0:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, wsconvert.WeightStandardization):
                    module.gain.mul_(1.5 + rank)
                    module.shift.add_(0.1 * rank)
            for param in model.parameters():
                param.add_(0.01)
    before = gain_shift(model)
    ddp = DDP(model)
    after_wrap = gain_shift(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ((x, y),) = batches(1, world_size, 8)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(ddp(shard(x, rank)), shard(y, rank))
    loss.backward()
    grads = _grads(model)
    optimizer.step()
    return {
        "before": before,
        "after_wrap": after_wrap,
        "grads": grads,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "evals": _eval(model, shard(x, rank)),
    }


def fsdp2_preserve_train(rank: int, world_size: int, workdir: Path) -> dict[str, Any]:
    """preserve under FSDP2: fully_shard per conv and at the root (gain/shift stay plain, unsharded buffers);
    SGD steps; evals with the WS eval cache on and off; the full state dict; then set_model_state_dict of
    another preserve model's state dict (other W *and* gain/shift) and eval again."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = preserve_cnn()
    for conv in (model.conv1, model.conv2, model.up):
        fully_shard(conv)
    fully_shard(model)
    sharded = [n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"]
    buffers = {n: type(b).__name__ for n, b in model.named_buffers() if n.endswith((".gain", ".shift"))}
    data, losses, evals = _fsdp2_steps(model, rank, world_size, 8)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # On CPU the full state dict holds the unsharded buffers themselves (gain/shift), not copies: the load below
    # writes into them, so keep what was saved.
    full = {key: value.clone() for key, value in full.items()}
    other = preserve_cnn(seed=1).state_dict()
    set_model_state_dict(model, other, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    evals["after_load"] = _eval(model, shard(data[0][0], rank))
    return {
        "losses": torch.stack(losses),
        "evals": evals,
        "state_dict": full if rank == 0 else None,
        "gain_shift": gain_shift(model),
        "sharded": sharded,
        "buffer_types": buffers,
    }
