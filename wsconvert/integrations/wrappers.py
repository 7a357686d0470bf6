"""The convert-first ordering rule: refuse a model wrapped by a training engine, with the way out.

DDP, FSDP2, torch.compile, autocast and the exporters take a converted model as it is (docs/integrations.md),
provided the model is converted *before* it is wrapped: a wrapper captures the modules and parameters it sees
when it wraps (DDP's gradient buckets, FSDP2's DTensor shards, compiled graphs, Opacus's layer hooks), so
``check_unwrapped`` makes convert_model / plan_conversion / bake refuse a wrapped model with the way out.
"""

from __future__ import annotations

from torch import nn

from .._optional import loaded_type
from ..errors import InvalidOptionError

__all__ = ["check_unwrapped", "find_wrapper"]

# (module, class, what users call it, where the bare model is). Looked up in sys.modules only: a model can
# only contain a wrapper whose module is already imported, and wsconvert imports none of them itself.
_WRAPPERS = (
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "DistributedDataParallel", ".module"),
    ("torch.nn.parallel.data_parallel", "DataParallel", "DataParallel", ".module"),
    ("torch._dynamo.eval_frame", "OptimizedModule", "torch.compile", "._orig_mod"),
    ("torch.distributed.fsdp", "FSDPModule", "FSDP2 fully_shard", "a model built afresh"),
    (
        "torch.distributed.fsdp.fully_sharded_data_parallel",
        "FullyShardedDataParallel",
        "FullyShardedDataParallel",
        "a model built afresh",
    ),
    ("opacus.grad_sample.gsm_base", "AbstractGradSampleModule", "Opacus GradSampleModule", "._module"),
)


def find_wrapper(model: nn.Module) -> tuple[str, str, str] | None:
    """``(module path, wrapper name, where the bare model is)`` of the first training wrapper in ``model``."""
    kinds = []
    for module_name, class_name, label, bare in _WRAPPERS:
        cls = loaded_type(module_name, class_name)
        if cls is not None:
            kinds.append((cls, label, bare))
    if not kinds:
        return None
    for path, module in model.named_modules():
        for cls, label, bare in kinds:
            if isinstance(module, cls):
                return path or "the model", label, bare
    return None


def check_unwrapped(model: nn.Module) -> None:
    """Raise InvalidOptionError if ``model`` is, or contains, a DDP / FSDP / torch.compile / Opacus wrapper."""
    found = find_wrapper(model)
    if found is not None:
        path, label, bare = found
        raise InvalidOptionError(
            f"{path} is wrapped by {label}: convert the bare model first, then wrap it (a wrapper captures the "
            f"modules and parameters it sees when it wraps; see docs/integrations.md). Pass the unwrapped model "
            f"({bare}) instead"
        )
