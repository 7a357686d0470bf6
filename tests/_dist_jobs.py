"""The jobs run by the spawned process group of test_integration_distributed.py, and their shared inputs.

Every builder seeds its own generator, so the parent test (single-process reference) and every rank build
bit-identical models and batches without shipping them between processes.
"""

from __future__ import annotations

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


def wide_cnn() -> nn.Module:
    """Few ops (cheap to compile) but ~2.7 MB of weights, so DDP with bucket_cap_mb=1 makes several buckets."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 256, 3, padding=1, bias=False),
        nn.BatchNorm2d(256),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1, bias=False),
        nn.BatchNorm2d(256),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    )
    return wsconvert.convert_model(net, gn=32)


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


def fsdp2_train(rank: int, world_size: int, workdir: Path) -> dict[str, Any]:
    """Point 2: fully_shard per residual block and at the root; SGD steps; evals; full state dict; load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = resnet18_gn()
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = batches(STEPS + 1, world_size, 32)
    losses, evals = [], {}
    for step, (x, y) in enumerate(data):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(shard(x, rank)), shard(y, rank))
        loss.backward()
        optimizer.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, op=dist.ReduceOp.AVG)
        losses.append(global_loss)
        if step >= STEPS - 1:  # eval after the last reference step, and again after one more step
            evals[f"after_step{step + 1}"] = _eval(model, shard(data[0][0], rank))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    initial = resnet18_gn().state_dict()
    set_model_state_dict(model, initial, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    evals["after_load"] = _eval(model, shard(data[0][0], rank))
    return {"losses": torch.stack(losses), "evals": evals, "state_dict": full if rank == 0 else None}


def ddp_compile(rank: int, world_size: int, workdir: Path, backend: str = "aot_eager") -> dict[str, Any]:
    """Point 3b: torch.compile(DDP(converted model)) with several buckets, i.e. DDPOptimizer graph splitting
    (the setup of pytorch#113415); two SGD steps, the second under error_on_recompile.

    pytorch#113415 fails inside AOTAutograd on the split graphs, which ``aot_eager`` runs in full; inductor's
    code generation for them is slow on a small CPU, so the default run uses aot_eager and a slow test inductor.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch._dynamo.reset()
    compile_graph = torch._dynamo.lookup_backend(backend)
    graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        graphs.append(len(gm.graph.nodes))
        return compile_graph(gm, example_inputs)

    model = wide_cnn()
    ddp = DDP(model, bucket_cap_mb=1)
    compiled = torch.compile(ddp, backend=counting_backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for step, (x, y) in enumerate(batches(2, world_size, 8)):
        optimizer.zero_grad()
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            loss = nn.functional.cross_entropy(compiled(shard(x, rank)), shard(y, rank))
        loss.backward()
        grads.append(_grads(model))
        optimizer.step()
    return {"grads": grads, "graphs": len(graphs), "optimize_ddp": torch._dynamo.config.optimize_ddp}
