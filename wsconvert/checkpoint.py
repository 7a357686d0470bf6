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
such as ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) are found by matching keys against the
architecture (:func:`match_prefix`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import pickle
import re
import secrets
import struct
import sys
import types
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .archive import inspect_zip
from .errors import CheckpointError

__all__ = [
    "INFO_KEY",
    "METADATA_INFO_KEY",
    "MODEL_KEYS",
    "Loaded",
    "default_output_path",
    "drop_reason",
    "is_state_dict",
    "load_checkpoint",
    "match_prefix",
    "read_info",
    "release_mapped_pages",
    "safe_globals",
    "sniff",
    "write_atomic",
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


# --- reading -------------------------------------------------------------------------------------


def _check_input(path: Path) -> int:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give the checkpoint file inside it")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); it is not a checkpoint")
    return size


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

    Zip archives are inspected first (:func:`wsconvert.archive.inspect_zip`): bounded, and mapped only when
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

    Tensors are memory-mapped (``mmap=True`` / lazy safetensors), not copied into memory.
    """
    path = Path(path)
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


def match_prefix(keys: list[str], expected: set[str]) -> tuple[str, int]:
    """The key prefix (e.g. "", "module.", "_orig_mod.", "model.") under which ``keys`` best match ``expected``.

    Every key votes for each prefix that leaves an expected key; the prefix with most votes wins (the
    shortest on a tie). Returns (prefix, number of keys matched). Linear in the total length of the keys:
    only the suffixes of a key with at most as many dot-separated parts and characters as the longest
    expected key are looked up (a key of 40,000 parts is not split 40,000 ways).
    """
    most_parts = max((k.count(".") + 1 for k in expected), default=0)
    longest = max(map(len, expected), default=0)
    votes: Counter[str] = Counter()
    for key in keys:
        cut = len(key)
        for _ in range(most_parts):
            cut = key.rfind(".", 0, cut)
            if len(key) - cut - 1 > longest:
                break
            if key[cut + 1 :] in expected:
                votes[key[: cut + 1]] += 1
            if cut < 0:
                break
    if not votes:
        return "", 0
    prefix, count = max(votes.items(), key=lambda item: (item[1], -len(item[0])))
    return prefix, count


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
    """``<stem>.ws<suffix>`` beside the input: model.pt -> model.ws.pt, m.safetensors -> m.ws.safetensors."""
    path = Path(path)
    return path.with_name(f"{path.stem}.ws{path.suffix}")


# --- writing -------------------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output_target(path: Path, *, force: bool) -> None:
    """Fail early for an existing output (without ``force``) or a missing / unwritable directory."""
    if path.is_dir():
        raise CheckpointError(f"output {path} is a directory; give a file name")
    if path.exists() and not force:
        raise CheckpointError(f"output {path} already exists; pass --force to overwrite it or -o to pick another name")
    directory = path.parent
    if not directory.is_dir():
        raise CheckpointError(f"output directory {directory} does not exist; create it first")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CheckpointError(f"output directory {directory} is not writable; pick another with -o")


@contextlib.contextmanager
def write_atomic(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; on success fsync it and rename it to ``path``.

    On any failure or interruption (KeyboardInterrupt included) the temporary file is removed and
    ``path`` is untouched. Without ``force`` an existing ``path`` is never replaced, not even one that
    appeared while writing (the final step is a hard link, which fails if the name exists).
    """
    path = Path(path)
    check_output_target(path, force=force)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:  # like open(..., "x"): mode 0o666 less the umask, unlike mkstemp's private 0o600
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as error:
        raise CheckpointError(f"cannot write to {path.parent}: {error.strerror or error}") from None
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise CheckpointError(f"output {path} appeared while writing; pass --force to overwrite it") from None
            except OSError:  # filesystems without hard links: fall back to a checked rename
                if path.exists():
                    raise CheckpointError(
                        f"output {path} appeared while writing; pass --force to overwrite it"
                    ) from None
                os.replace(tmp, path)
        _fsync_directory(path.parent)
    except OSError as error:
        raise CheckpointError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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
) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`write_atomic`).

    ``on_bytes`` is called with the number of bytes written so far; ``release`` names a memory-mapped
    input whose pages are dropped every RELEASE_EVERY_BYTES (:func:`release_mapped_pages`).
    """
    with write_atomic(path, force=force) as tmp, open(tmp, "wb") as f:
        torch.save(obj, _Writer(f, on_bytes, release) if (on_bytes or release) else f)
    if release is not None:
        release_mapped_pages(release)


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str], *, force: bool = False
) -> None:
    """Write a safetensors file atomically; non-contiguous tensors are made contiguous first."""
    from safetensors.torch import save_file

    flat = {k: (v if v.is_contiguous() else v.contiguous()) for k, v in tensors.items()}
    with write_atomic(path, force=force) as tmp:
        try:
            save_file(flat, str(tmp), metadata=metadata)
        except (ValueError, RuntimeError) as error:  # e.g. tensors sharing memory
            raise CheckpointError(f"cannot write safetensors file {path}: {_first_line(error)}") from None


def info_as_metadata(info: dict, metadata: Mapping[str, str]) -> dict[str, str]:
    """safetensors metadata (str -> str) with the wsconvert record added as JSON."""
    return {**dict(metadata), INFO_KEY: json.dumps(info, sort_keys=True)}
