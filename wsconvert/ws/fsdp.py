"""Detecting FSDP2 (``torch.distributed.fsdp.fully_shard``), whose all-gathers the WS eval cache cannot see.

FSDP2 keeps one unsharded Parameter per sharded one. Before each forward it all-gathers into that Parameter's
storage, which it frees (``storage.resize_(0)``) and re-allocates between forwards
(torch/distributed/fsdp/_fully_shard/_fsdp_param.py). Those writes leave the tensor's version counter alone
(measured with torch 2.14: ``_version`` stays 0 through training steps), and the allocator may hand back the
same address, so WeightStandardization's eval cache, keyed on address and version, could serve the W_hat of
earlier weights. Reproduced on CPU: under ``no_grad``, eval, update the sharded parameters in place (an EMA or
weight-decay step), eval again: some ranks got the old outputs. While FSDP2 is in use the cache is bypassed.
"""

from __future__ import annotations

from .._optional import loaded_module

__all__ = ["fsdp2_in_use"]

_seen = False
_states: dict | None = None  # the plain dict inside torch's WeakKeyDictionary of composable states


def fsdp2_in_use() -> bool:
    """True once any module of this process has been passed to ``fully_shard``.

    FSDP2 registers an ``FSDPState`` per sharded module in ``torch.distributed._composable_state``; without
    torch.distributed imported (or with nothing sharded) this costs one dictionary lookup.
    """
    global _seen, _states
    if _seen:
        return True
    if _states is None:  # look the module up until torch.distributed is imported, then keep its dict
        composable = loaded_module("torch.distributed._composable_state")
        mapping = getattr(composable, "_module_state_mapping", None)
        _states = getattr(mapping, "data", None)
        if _states is None:
            return False
    if not _states:  # a dict's truth test: this runs on every cached weight read
        return False
    for ref in list(_states.values()):
        if type(ref()).__name__ == "FSDPState":
            _seen = True
            return True
    return False
