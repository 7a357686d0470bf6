"""Loading an original (unconverted) model's state dict into a converted model.

parametrize moves a conv's ``weight`` to ``parametrizations.weight.original`` and GroupNorm has no running
statistics, so a plain checkpoint no longer loads strictly. Like the parametrized
``torch.nn.utils.parametrizations.weight_norm``, converted modules carry load_state_dict pre-hooks that map
the old keys. The hooks are module-level functions, so a baked model still pickles. The weight rename
acts only while the conv is standardized, so it is inert after ``remove_parametrizations``.
"""

from __future__ import annotations

from torch import nn

from .detect import standardization

__all__ = ["accept_plain_weight", "ignore_running_statistics", "remove_plain_weight_hook"]

_ORIGINAL_WEIGHT = "parametrizations.weight.original"
_RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _rename_plain_weight(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    # Decided at load time: after torch's own remove_parametrizations the conv has a plain weight again.
    plain, original = prefix + "weight", prefix + _ORIGINAL_WEIGHT
    if plain in state_dict and original not in state_dict and standardization(module) is not None:
        state_dict[original] = state_dict.pop(plain)


def _drop_running_statistics(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    for name in _RUNNING_STATISTICS:
        state_dict.pop(prefix + name, None)


def _has_hook(module: nn.Module, hook: object) -> bool:
    return any(getattr(h, "hook", h) is hook for h in module._load_state_dict_pre_hooks.values())


def accept_plain_weight(module: nn.Module) -> None:
    """Let a standardized conv load ``<prefix>weight`` into ``<prefix>parametrizations.weight.original``."""
    if not _has_hook(module, _rename_plain_weight):
        module.register_load_state_dict_pre_hook(_rename_plain_weight)


def ignore_running_statistics(module: nn.Module) -> None:
    """Let a GroupNorm that replaced a BatchNorm accept and ignore the BatchNorm's running statistics."""
    if not _has_hook(module, _drop_running_statistics):
        module.register_load_state_dict_pre_hook(_drop_running_statistics)


def remove_plain_weight_hook(module: nn.Module) -> None:
    """Remove the hook installed by ``accept_plain_weight`` (a baked conv has a plain ``weight`` again)."""
    hooks = module._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is _rename_plain_weight]:
        del hooks[key]
