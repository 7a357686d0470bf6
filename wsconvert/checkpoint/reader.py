"""Checkpoint files: format sniffing, safe loading, layout detection and atomic writing.

Formats are told apart by content, not by file name: a ``torch.save`` zip archive, the legacy
(pre-1.6) ``torch.save`` pickle stream, a safetensors file, or a TorchScript archive (refused).
``torch.save`` files are always opened with ``torch.load(weights_only=True, mmap=True)`` first, with an
allowlist of the few non-tensor classes that known training-checkpoint layouts store (timm train.py and
the torchvision references keep their ``args`` as an ``argparse.Namespace``; metrics may be numpy
scalars). A file that needs anything else is a pickle that runs code when loaded: it is only opened
with ``trust_pickle=True`` (torch.load's ``weights_only`` documentation;
``torch.serialization.safe_globals``).

Layouts (timm train.py, torchvision references/classification/train.py, Lightning): a raw state
dict; a training checkpoint holding model state dicts under keys such as ``state_dict``,
``state_dict_ema`` (timm), ``model``, ``model_ema`` (torchvision references, an AveragedModel with
``n_averaged`` + ``module.*`` keys), Lightning's ``state_dict`` with attribute prefixes; key prefixes
such as ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) and renamed keys are matched against the
architecture by ``wsconvert.checkpoint.keys``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import os
import pickle
import re
import secrets
import shutil
import signal
import stat
import struct
import sys
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, caused_by
from .archive import inspect_zip

__all__ = [
    "INFO_KEY",
    "METADATA_INFO_KEY",
    "MODEL_KEYS",
    "Loaded",
    "check_input_directory",
    "check_output_directory",
    "default_output_path",
    "drop_reason",
    "is_state_dict",
    "load_checkpoint",
    "read_info",
    "release_mapped_pages",
    "safe_globals",
    "sniff",
    "write_atomic",
    "write_directory_atomic",
    "write_safetensors",
    "write_torch",
]

# Where the options and version are recorded: a top-level entry of a checkpoint dict, an entry of a raw
# state dict's ``_metadata`` (which load_state_dict only reads per module path, so it never interferes),
# and a key of safetensors' string metadata.
INFO_KEY = "wsconvert"
METADATA_INFO_KEY = "__wsconvert__"

# Keys under which known training-checkpoint layouts keep a model state dict.
MODEL_KEYS = ("state_dict", "state_dict_ema", "model", "model_ema", "ema", "model_state_dict", "module", "net")
# Keys of learning-rate scheduler state (tied to the optimizer's parameter groups).
SCHEDULER_KEYS = ("lr_scheduler", "lr_schedulers", "scheduler", "schedulers", "scheduler_state_dict")

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


# numpy scalar type codes whose dtype classes the allowlist holds: bool, signed and unsigned integers, floats and
# complex numbers of every width (``type(np.dtype(code))`` is numpy 2's ``numpy.dtypes.*DType`` class, which
# weights_only loading must be allowed to rebuild; numpy 1.x has no such classes).
NUMPY_SCALAR_CODES = "?bBhHiIlLqQefdgFDG"
# The name numpy 1.x pickles its scalars under; numpy 2 keeps the function in numpy._core.multiarray.
NUMPY1_SCALAR = "numpy.core.multiarray.scalar"


def safe_globals() -> list:
    """The classes and functions that weights_only loading may rebuild beyond tensors and containers.

    ``argparse.Namespace`` (timm train.py and the torchvision references keep their ``args`` as one) and
    numpy scalars (metrics): ``numpy._core.multiarray.scalar``, the same function under numpy 1.x's name
    ``numpy.core.multiarray.scalar`` (a ``(function, name)`` pair, torch.serialization.add_safe_globals),
    ``numpy.dtype`` and the dtype classes of NUMPY_SCALAR_CODES. Nothing else: no object arrays, strings or
    void records.
    """
    allowed: list = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:  # numpy is optional for torch
        return allowed
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed += [scalar, np.dtype]
    if f"{scalar.__module__}.{scalar.__qualname__}" != NUMPY1_SCALAR:
        allowed.append((scalar, NUMPY1_SCALAR))
    dtype_classes = {type(np.dtype(code)) for code in NUMPY_SCALAR_CODES}
    allowed += sorted((c for c in dtype_classes if c is not np.dtype), key=lambda c: c.__qualname__)
    return allowed


def _allowed_names() -> set[str]:
    return {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in safe_globals()}


@dataclass
class Loaded:
    """A checkpoint read from disk.

    ``format`` is "torch" or "safetensors"; ``kind`` is "state_dict" (a raw state dict), "checkpoint"
    (a dict holding state dicts and other entries) or "module" (a whole pickled nn.Module).
    """

    path: Path
    format: str
    kind: str
    obj: Any
    metadata: dict[str, str] = field(default_factory=dict)
    mmap: bool = False
    # the files the tensors come from, when not ``path`` itself (a directory's weight files): their mapped pages
    # are released while writing and each must stay unchanged until the output is published
    files: list[Path] = field(default_factory=list)


# --- reading -------------------------------------------------------------------------------------


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is not a regular file once symlinks are followed, or None for a regular file.

    Without opening anything: "missing", "a dangling symlink (to ...)", "a symlink loop", "a directory",
    "a FIFO (named pipe)", "a socket", "a character device", "a block device" or "inaccessible (<stat error>)".
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symlink loop"
        if error.errno == errno.ENOENT and os.path.islink(path):
            return f"a dangling symlink (to {os.readlink(path)})"
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return "missing"
        return f"inaccessible ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), "not a regular file")


def check_input(path: Path) -> int:
    """The size of the regular file at ``path``; CheckpointError for anything else, before reading a byte.

    FIFOs, sockets and devices are refused without being opened (opening a FIFO blocks until a writer
    appears); the file is then opened non-blocking and checked again, so a name swapped meanwhile cannot
    make the command hang.
    """
    kind = not_a_regular_file(path)
    if kind == "missing":
        raise CheckpointError(f"{path}: no such file")
    if kind == "a directory":
        raise CheckpointError(f"{path} is a directory; give the checkpoint file inside it")
    if kind is not None and kind.startswith("inaccessible"):
        raise CheckpointError(f"cannot read {path}: {kind[len('inaccessible (') : -1]}")
    if kind is not None:
        raise CheckpointError(f"{path} is {kind}, not a regular file; give a checkpoint file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            status = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(status.st_mode):
        raise CheckpointError(f"{path} was replaced by something that is not a regular file while opening it")
    if status.st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); it is not a checkpoint")
    return status.st_size


_check_input = check_input  # the name sniff() calls


@dataclass(frozen=True)
class FileIdentity:
    """A file's device, inode, size and modification time: tells whether another process changed it."""

    path: Path
    key: tuple[int, int, int, int]

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileIdentity | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(Path(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))

    def change(self) -> str | None:
        """How the file changed since this identity was taken ("truncated to 100 bytes", ...), or None."""
        now = FileIdentity.of(self.path)
        if now is None:
            return "removed"
        if now.key == self.key:
            return None
        if now.key[:2] != self.key[:2]:
            return "replaced by another file"
        if now.key[2] != self.key[2]:
            return f"{'truncated' if now.key[2] < self.key[2] else 'grown'} to {now.key[2]} bytes (was {self.key[2]})"
        return "modified"

    def changed_error(self, change: str) -> CheckpointError:
        return CheckpointError(
            f"input {self.path} changed while converting ({change}, by another process?); nothing was written, "
            "rerun once the file is complete"
        )


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def sniff(path: str | os.PathLike) -> str:
    """The file's format from its content: "torch-zip", "torch-legacy" or "safetensors".

    Raises CheckpointError for a missing, empty, truncated or unrecognized file and for TorchScript.
    """
    path = Path(path)
    size = _check_input(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise CheckpointError(
                f"{path} is a truncated or corrupt zip archive ({error}); re-save or re-download it"
            ) from None
        if any("/code/" in name or name.endswith("/constants.pkl") for name in names):
            raise CheckpointError(
                f"{path} is a TorchScript archive (torch.jit.save): its modules are compiled code that wsconvert "
                "cannot rewrite; convert the original Python model (or its state_dict() with --arch), then script it"
            )
        if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
            raise CheckpointError(f"{path} is a zip archive but not a torch.save checkpoint (no data.pkl inside)")
        return "torch-zip"
    if _is_safetensors(head, size):
        return "safetensors"
    if head[:1] == bytes([_PICKLE_PROTO]):
        return "torch-legacy"
    raise CheckpointError(
        f"{path} is not a PyTorch (torch.save) or safetensors checkpoint (it starts with bytes {head[:8]!r})"
    )


def _pickle_refusal(path: Path, unsafe: list[str]) -> CheckpointError:
    shown = ", ".join(unsafe[:3]) + (f" (+{len(unsafe) - 3} more)" if len(unsafe) > 3 else "")
    what = f" ({shown})" if shown else ""
    return CheckpointError(
        f"{path} holds pickled Python objects{what} beyond tensors, e.g. a whole model saved with "
        "torch.save(model); loading such a pickle runs code from the file, so nothing in it was loaded. "
        "If you trust the file, rerun with --trust-pickle; otherwise save model.state_dict() instead and pass --arch"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class _AllowlistUnpickler(pickle.Unpickler):
    """The standard unpickler restricted to weights_only's allowlist, for pickle protocols above 2.

    torch's weights_only unpickler parses protocol 2 opcodes only (protocol 4's FRAME: "Unsupported operand
    149"), yet ``torch.save(..., pickle_protocol=4)`` files are legal. This is the "Restricting Globals" recipe
    of Python's pickle documentation with torch's own allowlist (torch/_weights_only_unpickler.py) plus
    :func:`safe_globals`: a name outside it raises the message torch raises, nothing else is imported.
    """

    def find_class(self, module: str, name: str) -> Any:
        from torch import _weights_only_unpickler as weights_only

        full = f"{module}.{name}"
        found = weights_only._get_allowed_globals().get(full) or weights_only._get_user_allowed_globals().get(full)
        if found is None:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {full} was not an allowed global")
        return found


def _allowlist_pickle_module() -> types.ModuleType:
    """A ``pickle_module`` for torch.load whose Unpickler (and ``load``, used by the legacy format) is restricted."""
    module = types.ModuleType("wsconvert_allowlist_pickle")
    module.Unpickler = _AllowlistUnpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kwargs: _AllowlistUnpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    return module


def _legacy_protocol(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(2)
    return head[1] if len(head) == 2 and head[0] == _PICKLE_PROTO else 0


def _torch_load(path: Path, fmt: str, trust_pickle: bool) -> tuple[Any, bool]:
    """torch.load with the allowlist; returns (object, whether its tensors are memory-mapped).

    Zip archives are inspected first (:func:`wsconvert.checkpoint.archive.inspect_zip`): bounded, and mapped only when
    every tensor record is stored uncompressed and aligned, otherwise read into memory (the values torch.load
    returns without mmap). Protocol 2 pickles use torch's weights_only unpickler, later protocols
    :class:`_AllowlistUnpickler`; anything outside the allowlist needs ``trust_pickle``.
    """
    if fmt == "torch-zip":
        layout = inspect_zip(path)
        mmap, protocol = layout.mappable, layout.protocol
    else:
        mmap, protocol = False, _legacy_protocol(path)
    unsafe: list[str] = []
    if fmt == "torch-zip" and protocol <= 2:
        try:
            allowed = _allowed_names()
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            unsafe = sorted({g for g in found if g not in allowed})  # sorted: the same message every run
        except Exception as error:  # reading the pickle's opcodes only: any failure means a broken file
            raise CheckpointError(f"cannot read {path}: {_first_line(error)} (truncated or corrupt?)") from None
        if unsafe and not trust_pickle:
            raise _pickle_refusal(path, unsafe)
    weights_only = not unsafe
    restricted = {"weights_only": False, "pickle_module": _allowlist_pickle_module()} if protocol > 2 else {}
    try:
        with torch.serialization.safe_globals(safe_globals()):
            if weights_only and restricted:
                return torch.load(path, map_location="cpu", mmap=mmap, **restricted), mmap
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap), mmap
    except pickle.UnpicklingError as error:
        globals_needed = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if globals_needed and not trust_pickle:
            raise _pickle_refusal(path, globals_needed) from None
        if trust_pickle and weights_only:  # the allowlist was not enough: the user trusts the file
            try:
                return torch.load(path, map_location="cpu", weights_only=False), False
            except Exception as inner:  # code from a trusted pickle can raise anything
                raise CheckpointError(f"cannot load {path} (--trust-pickle): {_first_line(inner)}") from None
        raise CheckpointError(f"cannot read {path}: {_first_line(error)} (truncated or corrupt?)") from None
    except CheckpointError:
        raise
    except Exception as error:  # torch raises RuntimeError/EOFError/... for broken archives
        raise CheckpointError(f"cannot read {path}: {_first_line(error)} (truncated or corrupt?)") from None


def _safetensors_load(path: Path) -> tuple[OrderedDict, dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = OrderedDict((key, f.get_tensor(key)) for key in f.keys())
    except Exception as error:  # SafetensorError, OSError, ...
        raise CheckpointError(f"cannot read safetensors file {path}: {_first_line(error)}") from None
    if not tensors:
        raise CheckpointError(f"{path} is a safetensors file without tensors; nothing to convert")
    return tensors, metadata


def load_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> Loaded:
    """Read a checkpoint safely and tell its kind: raw state dict, training checkpoint or whole module.

    Tensors are memory-mapped (``mmap=True`` / lazy safetensors), not copied into memory. A directory is read as
    a ``save_pretrained`` directory (config.json plus weights: :func:`wsconvert.checkpoint.directory.read_directory`).
    """
    path = Path(path)
    if not_a_regular_file(path) == "a directory":
        from .directory import read_directory  # same layer; imported here, it builds on this module

        return read_directory(path, trust_pickle=trust_pickle)
    fmt = sniff(path)
    if fmt == "safetensors":
        tensors, metadata = _safetensors_load(path)
        return Loaded(path, "safetensors", "state_dict", tensors, metadata, mmap=True)
    obj, mmap = _torch_load(path, fmt, trust_pickle)
    if isinstance(obj, torch.jit.ScriptModule):
        raise CheckpointError(
            f"{path} holds a TorchScript module, which wsconvert cannot rewrite; convert the "
            "original Python model, then script it"
        )
    if isinstance(obj, nn.Module):
        return Loaded(path, "torch", "module", obj, mmap=mmap)
    if is_state_dict(obj):
        return Loaded(path, "torch", "state_dict", obj, mmap=mmap)
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj):
        return Loaded(path, "torch", "checkpoint", obj, mmap=mmap)
    described = type(obj).__name__ + (" (empty)" if isinstance(obj, (Mapping, list, tuple)) and not obj else "")
    raise CheckpointError(
        f"{path} holds a {described}, not a model checkpoint; expected a state dict (str -> tensor), a training "
        "checkpoint dict holding one, or a whole nn.Module"
    )


def is_state_dict(obj: object) -> bool:
    """A non-empty mapping of str keys to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _is_optimizer_state(value: object) -> bool:
    if isinstance(value, Mapping):
        return "state" in value and "param_groups" in value
    if isinstance(value, (list, tuple)) and value:
        return all(_is_optimizer_state(v) for v in value)
    return False


def drop_reason(key: str, value: object) -> str | None:
    """Why a checkpoint entry is dropped from the output (optimizer / scheduler state), or None to keep it.

    Optimizer state is positional (pytorch #1489) and the conversion changes parameter order and shapes
    (parametrize moves conv weights, BatchNorm -> GroupNorm), so old state would silently misalign.
    """
    if _is_optimizer_state(value) or key in ("optimizer", "optimizers", "optimizer_states", "optimizer_state_dict"):
        return "optimizer state: positional, no longer lines up with the converted model's parameters"
    if key in SCHEDULER_KEYS:
        return "scheduler state: tied to the dropped optimizer's parameter groups"
    return None


def read_info(obj: object) -> dict | None:
    """The wsconvert record in a loaded output (checkpoint entry, state-dict metadata), if any."""
    if isinstance(obj, Mapping):
        info = obj.get(INFO_KEY) if not is_state_dict(obj) else None
        if isinstance(info, Mapping):
            return dict(info)
        metadata = getattr(obj, "_metadata", None)
        if isinstance(metadata, Mapping) and isinstance(metadata.get(METADATA_INFO_KEY), Mapping):
            return dict(metadata[METADATA_INFO_KEY])
    return None


def default_output_path(path: str | os.PathLike) -> Path:
    """``<stem>.ws<suffix>`` beside the input: model.pt -> model.ws.pt, m.safetensors -> m.ws.safetensors; for a
    directory ``<name>.ws`` beside it (bit-tiny/ -> bit-tiny.ws/)."""
    path = Path(path)
    if not_a_regular_file(path) == "a directory":
        path = path if path.name else Path(os.path.abspath(path))  # "." or "..": name the directory itself
        return path.with_name(f"{path.name}.ws")
    return path.with_name(f"{path.stem}.ws{path.suffix}")


def check_input_directory(path: Path) -> None:
    """Refuse a directory input that cannot be listed (CheckpointError); its entries are checked when it is read."""
    if not_a_regular_file(path) != "a directory":
        raise CheckpointError(f"{path} is not a directory")
    try:
        os.listdir(path)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None


def is_wsconvert_directory(path: Path) -> bool:
    """Whether ``path`` is a directory that wsconvert wrote: its config.json (a regular file) holds a top-level
    ``INFO_KEY`` record. Only such a directory may be replaced by ``--force``."""
    config = path / "config.json"
    if path.is_symlink() or not_a_regular_file(path) != "a directory" or not_a_regular_file(config) is not None:
        return False
    try:
        if os.stat(config).st_size > 64 * 2**20:
            return False
        value = json.loads(config.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and isinstance(value.get(INFO_KEY), dict) and "version" in value[INFO_KEY]


def check_output_directory(path: Path, *, force: bool) -> None:
    """Fail early for a directory output (a converted ``save_pretrained`` directory) that cannot be written.

    Refused: a name too long for its filesystem, a missing or unwritable parent, a symlink, a file or special file
    under that name, and an existing directory, unless ``force`` is given and it is a directory wsconvert wrote
    (:func:`is_wsconvert_directory`): ``--force`` never deletes a directory of other files.
    """
    name_max = _name_max(path.parent)
    if len(os.fsencode(path.name)) > name_max:
        raise CheckpointError(
            f"output name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes, longer than the "
            f"{name_max} its filesystem allows; pick a shorter -o"
        )
    if path.is_symlink():
        raise CheckpointError(
            f"output {path} is a symlink; wsconvert writes the converted directory itself: pick another -o"
        )
    kind = not_a_regular_file(path)
    if kind is None:
        raise CheckpointError(
            f"output {path} is a file; a save_pretrained directory converts to a directory: pick another -o"
        )
    if kind == "a directory":
        if not force:
            raise CheckpointError(
                f"output {path} already exists; pass --force to replace it or -o to pick another name"
            )
        if not is_wsconvert_directory(path):
            raise CheckpointError(
                f"output {path} is an existing directory that wsconvert did not write (no wsconvert record in its "
                "config.json); --force only replaces a converted directory: remove it yourself or pick another -o"
            )
    elif kind != "missing":
        raise CheckpointError(f"output {path} is {kind}; pick another -o")
    _check_output_parent(path.parent)


def _check_output_parent(directory: Path) -> None:
    """The directory an output goes into exists, is a directory and is writable."""
    kind = not_a_regular_file(directory)
    if kind == "missing":
        raise CheckpointError(f"output directory {directory} does not exist; create it first")
    if kind != "a directory":
        raise CheckpointError(f"output directory {directory} is {kind or 'a file'}, not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CheckpointError(f"output directory {directory} is not writable; pick another with -o")


# --- writing -------------------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replaceable(kind: str | None) -> bool:
    """Whether an output name of this kind (:func:`not_a_regular_file`) may become the written file."""
    return kind is None or kind.startswith(("missing", "a dangling symlink", "a symlink loop"))


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no such directory yet
        return 255


def check_output_target(path: Path, *, force: bool) -> None:
    """Fail early for an output that is not a regular file, that exists (without ``force``), whose name is too
    long for its filesystem, or whose directory is missing or unwritable.

    Directories, FIFOs, sockets and devices (also behind a symlink) are refused even with ``force``:
    replacing one with a regular file is never what ``-o`` meant.
    """
    name_max = _name_max(path.parent)
    if len(os.fsencode(path.name)) > name_max:
        raise CheckpointError(
            f"output name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes, longer than the "
            f"{name_max} its filesystem allows; pick a shorter -o"
        )
    kind = not_a_regular_file(path)
    if kind == "a directory":
        raise CheckpointError(f"output {path} is a directory; give a file name")
    if not _replaceable(kind):
        raise CheckpointError(f"output {path} is {kind}; wsconvert writes only regular files, pick another -o")
    if os.path.lexists(path) and not force:
        raise CheckpointError(f"output {path} already exists; pass --force to overwrite it or -o to pick another name")
    _check_output_parent(path.parent)


def _temp_path(path: Path) -> Path:
    """``.<name>.<random>.tmp`` beside ``path``, the name shortened so that it fits the filesystem's NAME_MAX."""
    suffix = f".{secrets.token_hex(8)}.tmp"
    budget = _name_max(path.parent) - len(suffix) - 1
    name = path.name
    while name and len(os.fsencode(name)) > budget:
        name = name[:-1]
    return path.parent / f".{name}{suffix}"


def _write_failure(path: Path, error: BaseException, source: FileIdentity | None) -> BaseException:
    """What a failure while writing ``path`` becomes: one CheckpointError line, or KeyboardInterrupt for Ctrl-C.

    torch's zip writer re-raises a failing ``write()`` (ENOSPC, EIO, Ctrl-C) as a RuntimeError whose context is
    the original; safetensors reports ``I/O error: ... (os error 28)``. A failure after the input changed (a
    truncated memory-mapped input makes reads fail with EFAULT) is reported as that change. Any other exception
    is returned as it is (a bug, or a library error that the caller words).
    """
    if caused_by(error, KeyboardInterrupt):
        return error if isinstance(error, KeyboardInterrupt) else KeyboardInterrupt()
    change = source.change() if source is not None else None
    if change is not None:
        return source.changed_error(change)
    if isinstance(error, CheckpointError):
        return error
    os_error = caused_by(error, OSError)
    if isinstance(os_error, OSError):
        return CheckpointError(f"cannot write {path}: {os_error.strerror or _first_line(os_error)}")
    os_code = re.search(r"os error (\d+)", str(error))
    if os_code:
        return CheckpointError(f"cannot write {path}: {os.strerror(int(os_code.group(1)))}")
    if isinstance(error, RuntimeError) and _TORCH_WRITER_FAILURE.search(str(error)):
        return CheckpointError(f"cannot write {path}: {_first_line(error)}")
    return error


# torch's zip writer (caffe2/serialize/inline_container.cc) when the stream under it failed.
_TORCH_WRITER_FAILURE = re.compile(r"PytorchStreamWriter|inline_container|basic_ios|file write failed")


_SIGBUS_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)


@functools.lru_cache(maxsize=1)
def _libc_signal() -> Callable | None:
    """libc's ``signal()`` (POSIX with SIGBUS), looked up once: find_library may run ``ldconfig``."""
    libc_name = ctypes.util.find_library("c") if hasattr(signal, "SIGBUS") and os.name == "posix" else None
    if libc_name is None:
        return None
    try:
        libc_signal = ctypes.CDLL(libc_name).signal
    except (OSError, AttributeError):
        return None
    libc_signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc_signal.restype = ctypes.c_void_p
    return libc_signal


def _remove_workdir(workdir: str | bytes | os.PathLike) -> None:
    """Remove the private temporary directory of a write and what it holds (no subdirectories; only syscalls,
    so the SIGBUS handler can use it too)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(workdir):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)


@contextlib.contextmanager
def _exit_on_sigbus(workdir: Path, source: FileIdentity | None) -> Iterator[None]:
    """While writing from a memory-mapped input: if another process truncates it, exit with one line, not a crash.

    Reading a page of a mapping beyond the file's new end raises SIGBUS, which Python cannot turn into an
    exception (the faulting read would repeat forever). This C-level handler removes the temporary directory,
    prints ``Error: input ... changed while converting`` and ends the process with exit code 1.
    POSIX only; elsewhere a no-op.
    """
    libc_signal = _libc_signal() if source is not None else None
    if libc_signal is None:
        yield
        return
    clear = "\r\x1b[K" if os.isatty(2) else ""
    message = f"{clear}Error: {source.changed_error('truncated under its memory map: SIGBUS')}\n".encode()
    workdir_name = os.fsencode(workdir)

    def handler(signum: int) -> None:  # pragma: no cover - runs in a child process that it ends
        _remove_workdir(workdir_name)
        os.write(2, message)
        os._exit(1)

    c_handler = _SIGBUS_HANDLER(handler)
    previous = libc_signal(signal.SIGBUS, ctypes.cast(c_handler, ctypes.c_void_p))
    try:
        yield
    finally:
        libc_signal(signal.SIGBUS, previous)


@contextlib.contextmanager
def write_atomic(path: str | os.PathLike, *, force: bool = False, source: FileIdentity | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; on success fsync it and rename it to ``path``.

    The temporary file lives in a private directory ``.<name>.<random>.tmp`` beside ``path`` (so that whatever
    a writer adds there, e.g. safetensors' own temporary file, goes with it). On any failure or interruption
    (KeyboardInterrupt included) that directory is removed and ``path`` is
    untouched; failures to write (ENOSPC, EIO, ...) become one CheckpointError naming ``path`` and the
    error's text (:func:`_write_failure`). Without ``force`` an existing ``path`` is never replaced, not even one
    that appeared while writing (the final step is a hard link, which fails if the name exists). ``source``
    is the input the data comes from: if it changes while writing, nothing is written (CheckpointError), and
    a SIGBUS from its truncated memory map ends the process with one line (:func:`_exit_on_sigbus`).
    """
    path = Path(path)
    check_output_target(path, force=force)
    workdir = _temp_path(path)
    tmp = workdir / path.name
    try:
        os.mkdir(workdir, 0o700)
    except OSError as error:
        raise CheckpointError(f"cannot write to {path.parent}: {error.strerror or error}") from None
    try:
        # like open(..., "x"): mode 0o666 less the umask, unlike mkstemp's private 0o600
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        with _exit_on_sigbus(workdir, source):
            try:
                yield tmp
            except BaseException as error:
                failure = _write_failure(path, error, source)
                if failure is error:
                    raise
                raise failure from None
        change = source.change() if source is not None else None
        if change is not None:
            raise source.changed_error(change)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, path, force)
        _fsync_directory(path.parent)
    except OSError as error:
        raise CheckpointError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        _remove_workdir(workdir)


def _publish(tmp: Path, path: Path, force: bool) -> None:
    """Give the written temporary file its final name (see :func:`write_atomic`)."""
    if force:
        kind = not_a_regular_file(path)  # again: a special file may have appeared while writing
        if not _replaceable(kind):
            raise CheckpointError(f"output {path} became {kind} while writing; nothing was written")
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise CheckpointError(f"output {path} appeared while writing; pass --force to overwrite it") from None
    except OSError:  # filesystems without hard links: fall back to a checked rename
        if os.path.lexists(path):
            raise CheckpointError(f"output {path} appeared while writing; pass --force to overwrite it") from None
        os.replace(tmp, path)


# renameat2(2) flags (Linux >= 3.15, glibc >= 2.28): publish a directory without replacing one that appeared
# meanwhile (NOREPLACE), or swap it with the old converted directory in one step (EXCHANGE).
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _rename2(old: Path, new: Path, flags: int) -> bool:
    """``renameat2(old, new, flags)``: True when done, False when this system or filesystem lacks it (then the
    caller falls back to checked ``os.rename`` calls); OSError (e.g. FileExistsError) for a refusal."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EINVAL)):
        return False
    raise OSError(code, os.strerror(code), str(new))


def _publish_directory(tmp: Path, path: Path, force: bool) -> None:
    """Give the written temporary directory its final name (see :func:`write_directory_atomic`)."""
    appeared = f"output {path} appeared while writing; pass --force to replace it or -o to pick another name"
    if force and os.path.lexists(path):
        if not is_wsconvert_directory(path):  # again: something else may have appeared under that name meanwhile
            raise CheckpointError(f"output {path} is no longer a directory wsconvert wrote; nothing was replaced")
        if _rename2(tmp, path, _RENAME_EXCHANGE):
            return  # ``tmp`` now holds the old directory, which the caller removes
        old = _temp_path(path)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        if _rename2(tmp, path, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise CheckpointError(appeared) from None
    if os.path.lexists(path):
        raise CheckpointError(appeared)
    os.rename(tmp, path)


@contextlib.contextmanager
def write_directory_atomic(
    path: str | os.PathLike,
    *,
    force: bool = False,
    sources: list[FileIdentity] | None = None,
    sigbus_source: FileIdentity | None = None,
) -> Iterator[Path]:
    """Yield a new temporary directory beside ``path`` to write the files of a directory output into; on success
    fsync them and rename the directory to ``path``.

    The directory is ``.<name>.<random>.tmp`` (mode from the umask). On any failure or interruption it is removed
    with what it holds and ``path`` is untouched; write failures become one CheckpointError naming ``path``
    (:func:`_write_failure`). Without ``force`` an existing ``path`` is never replaced, not even one that
    appeared meanwhile (``renameat2(RENAME_NOREPLACE)`` where available, else a checked rename); with ``force``
    only a directory wsconvert wrote is replaced, swapped in one step (``RENAME_EXCHANGE``) where available.
    ``sources`` are the input files: if one changes before the end, nothing is published; ``sigbus_source``
    names the input in the message when a truncated memory map raises SIGBUS (:func:`_exit_on_sigbus`).
    """
    path = Path(path)
    check_output_directory(path, force=force)
    workdir = _temp_path(path)

    def changed() -> CheckpointError | None:
        for source in sources or []:
            change = source.change()
            if change is not None:
                return source.changed_error(change)
        return None

    try:
        os.mkdir(workdir, 0o777)  # like any new directory: its mode follows the umask
    except OSError as error:
        raise CheckpointError(f"cannot write to {path.parent}: {error.strerror or error}") from None
    try:
        with _exit_on_sigbus(workdir, sigbus_source):
            try:
                yield workdir
            except BaseException as error:
                failure = _write_failure(path, error, None)
                if not isinstance(failure, KeyboardInterrupt):
                    failure = changed() or failure
                if failure is error:
                    raise
                raise failure from None
        failure = changed()
        if failure is not None:
            raise failure
        for name in sorted(os.listdir(workdir)):
            with open(workdir / name, "rb+") as f:
                os.fsync(f.fileno())
        _fsync_directory(workdir)
        _publish_directory(workdir, path, force)
        _fsync_directory(path.parent)
    except OSError as error:
        raise CheckpointError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# While writing, drop the input file's pages from this process every this many bytes (see release_mapped_pages).
RELEASE_EVERY_BYTES = 64 * 2**20
_MADV_DONTNEED = 4  # Linux


def _madvise() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


# /proc/self/pagemap entry bits (Linux Documentation/admin-guide/mm/pagemap.rst; readable without privileges).
_PAGE_PRESENT_BIT, _PAGE_SWAPPED_BIT, _PAGE_FILE_BIT = 63, 62, 61


def _file_identical_runs(start: int, end: int) -> list[tuple[int, int]]:
    """The address ranges within [start, end) of a private file mapping whose pages may be dropped.

    A page of a private mapping that was written to (torch byteswaps a big-endian checkpoint in place; code
    may modify a loaded tensor) becomes an anonymous private copy: dropping it would make the next read return
    the file's bytes, not the values. The kernel tells which pages are such copies: present but not file pages,
    or swapped out. Only runs of the other pages are returned; none when the page map cannot be read.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    count = (end - start) // page
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(start // page * 8)
            data = pagemap.read(count * 8)
    except OSError:
        return []
    if count == 0 or len(data) != count * 8:
        return []
    entries = torch.frombuffer(bytearray(data), dtype=torch.int64)
    present = entries < 0  # bit 63 is the sign bit
    swapped = (entries >> _PAGE_SWAPPED_BIT) & 1 == 1
    file_page = (entries >> _PAGE_FILE_BIT) & 1 == 1
    private_copy = (present & ~file_page) | swapped
    if not bool(private_copy.any()):
        return [(start, end)]
    border = torch.ones(1, dtype=torch.int8)
    edges = torch.diff(torch.cat([border, private_copy.to(torch.int8), border]))
    begins = (edges == -1).nonzero().flatten().tolist()  # a private copy ends, a run of file pages starts
    ends = (edges == 1).nonzero().flatten().tolist()
    return [(start + a * page, start + b * page) for a, b in zip(begins, ends, strict=True)]


def release_mapped_pages(path: str | os.PathLike) -> int:
    """Drop this process's resident pages of its private memory maps of ``path`` that equal the file (Linux).

    ``torch.load(mmap=True)`` maps the input file privately; pages read while writing the output stay
    resident and count towards the process's memory. ``madvise(MADV_DONTNEED)`` drops them, and the kernel
    re-reads them from the page cache if needed again, which is only right for pages that still equal the
    file: pages the process wrote to (a big-endian checkpoint, which torch byteswaps on load, or a tensor
    modified in memory) are kept (:func:`_file_identical_runs`). Elsewhere, or without a readable
    /proc/self/pagemap, nothing is dropped. Returns the number of bytes advised.
    """
    madvise = _madvise()
    if madvise is None:
        return 0
    real = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return 0
    released = 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == real and fields[1].endswith("p"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            for begin, stop in _file_identical_runs(start, end):
                if madvise(begin, stop - begin, _MADV_DONTNEED) == 0:
                    released += stop - begin
    return released


class _Writer:
    """A binary file wrapper: reports bytes written and releases the input's mapped pages as it goes."""

    def __init__(self, file: Any, on_bytes: Callable[[int], None] | None, release: str | os.PathLike | None) -> None:
        self._file = file
        self._on_bytes = on_bytes
        self._release = release
        self._written = 0
        self._since_release = 0

    def write(self, data: Any) -> int:
        n = self._file.write(data)
        n = len(memoryview(data).cast("B")) if n is None else n
        self._written += n
        self._since_release += n
        if self._release is not None and self._since_release >= RELEASE_EVERY_BYTES:
            release_mapped_pages(self._release)
            self._since_release = 0
        if self._on_bytes is not None:
            self._on_bytes(self._written)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def write_torch(
    obj: object,
    path: str | os.PathLike,
    *,
    force: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    release: str | os.PathLike | None = None,
    source: FileIdentity | None = None,
) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`write_atomic`, also for ``source``).

    ``on_bytes`` is called with the number of bytes written so far; ``release`` names a memory-mapped
    input whose pages are dropped every RELEASE_EVERY_BYTES (:func:`release_mapped_pages`).
    """
    with write_atomic(path, force=force, source=source) as tmp, open(tmp, "wb") as f:
        # Always through _Writer: every write is a Python call, where Ctrl-C and failures surface at once.
        # torch.serialization.save, not torch.save: importing ultralytics replaces torch.save with a wrapper that
        # retries a failed save (ultralytics/utils/patches.py torch_save), which would rewrite into the same
        # stream after a full disk or a Ctrl-C and report success.
        torch.serialization.save(obj, _Writer(f, on_bytes, release))
    if release is not None:
        release_mapped_pages(release)


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str],
    *,
    force: bool = False,
    source: FileIdentity | None = None,
) -> None:
    """Write a safetensors file atomically (see :func:`write_atomic`); non-contiguous tensors are made contiguous
    first. safetensors' own failures (e.g. tensors sharing memory, a full disk) become one CheckpointError."""
    from safetensors.torch import save_file

    flat = {k: (v if v.is_contiguous() else v.contiguous()) for k, v in tensors.items()}
    with write_atomic(path, force=force, source=source) as tmp:
        try:
            save_file(flat, str(tmp), metadata=metadata)
        except Exception as error:  # safetensors' own: SafetensorError (a full disk, ...), tensors sharing memory
            failure = _write_failure(Path(path), error, source)
            if failure is error:
                failure = CheckpointError(f"cannot write safetensors file {path}: {_first_line(error)}")
            raise failure from None


def info_as_metadata(info: dict, metadata: Mapping[str, str]) -> dict[str, str]:
    """safetensors metadata (str -> str) with the wsconvert record added as JSON."""
    return {**dict(metadata), INFO_KEY: json.dumps(info, sort_keys=True)}
