"""Types from optional packages (timm, torchvision, transformers, opacus, torch.distributed), found without importing.

A model can only hold an instance of a class whose module is already imported, so wsconvert looks such
classes up in ``sys.modules`` and never imports those packages itself: ``import wsconvert`` stays light and
a missing optional package simply means its types cannot occur.
"""

from __future__ import annotations

import sys

__all__ = ["loaded_type", "loaded_types", "loaded_module"]


def loaded_module(module_name: str) -> object | None:
    """The module ``module_name`` if something already imported it, else None."""
    return sys.modules.get(module_name)


def loaded_type(module_name: str, class_name: str) -> type | None:
    """``module_name.class_name`` when that module is already imported and the name is a class, else None."""
    value = getattr(sys.modules.get(module_name), class_name, None)
    return value if isinstance(value, type) else None


def loaded_types(module_name: str, *class_names: str) -> tuple[type, ...]:
    """The classes among ``class_names`` that ``module_name`` defines, if that module is already imported."""
    found = (loaded_type(module_name, name) for name in class_names)
    return tuple(cls for cls in found if cls is not None)
