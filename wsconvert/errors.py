"""The exception hierarchy: every error wsconvert raises on purpose is a WSConvertError.

Messages name the module path or the value that failed and say what to do instead.
"""

from __future__ import annotations

__all__ = [
    "WSConvertError",
    "InvalidOptionError",
    "UnsupportedModuleError",
    "CheckpointError",
    "ArchitectureError",
    "ProbeUnavailableWarning",
    "FrozenModelWarning",
    "caused_by",
]


class WSConvertError(ValueError):
    """Base class of all wsconvert errors (a ValueError, so generic handlers still catch it)."""


class InvalidOptionError(WSConvertError):
    """An option given to convert_model / plan_conversion / the CLI has a bad value."""


class UnsupportedModuleError(WSConvertError):
    """A module cannot be converted in its current state (e.g. an uninitialized lazy module)."""


class CheckpointError(WSConvertError):
    """A checkpoint file cannot be read, recognized, matched to an architecture or written."""


class ArchitectureError(WSConvertError):
    """An architecture spec (torchvision:NAME, timm:NAME, module:callable) cannot be resolved."""


class ProbeUnavailableWarning(UserWarning):
    """A check that needs a forward pass or a trace of the model could not run, so its result is missing.

    Raised as a warning (filter it with ``warnings.filterwarnings("ignore", category=ProbeUnavailableWarning)``)
    when ``skip_unnormalized=True`` could not find the unnormalized convs, or when the example input could not
    be used to check GroupNorm group sizes; the fix is an input that the model runs on (``example_inputs=`` /
    ``input_shape=``, CLI ``--input-shape``).
    """


class FrozenModelWarning(UserWarning):
    """A conversion left every conv it would standardize because all their weights are frozen
    (``requires_grad=False``), so the model came out without WS. Unfreeze the model before converting, or pass
    ``standardize_frozen=True`` (CLI ``--standardize-frozen``)."""


def caused_by(
    error: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first exception of type ``kind`` in ``error``'s chain (itself, then its cause or context), or None.

    Libraries re-raise failures of Python callbacks as their own errors: torch's zip writer turns an OSError
    or a KeyboardInterrupt inside ``write()`` into a RuntimeError whose ``__context__`` is the original.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ if current.__cause__ is not None else current.__context__
    return None
