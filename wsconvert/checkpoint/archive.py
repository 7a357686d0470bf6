"""What a ``torch.save`` zip archive holds, read from its directory before anything is unpickled or inflated.

``torch.load(mmap=True)`` maps the archive and reads each tensor record at its offset in the file, which is
only right for records stored uncompressed (the way ``torch.save`` writes them, 64-byte aligned). An archive
re-zipped by another tool may hold DEFLATE-compressed or unaligned records: mapped, those give garbage
weights, so they are read without mmap (torch inflates them, as ``torch.load`` does by default). The same
directory bounds what the archive may inflate to (a zip bomb's small file claims gigabytes), the byte order
torch will swap from and the pickle protocol (torch's weights_only unpickler only reads protocol 2).
Sources: the ZIP format (PKWARE APPNOTE 4.3.7, local file header), torch/serialization.py ``_load``
(``byteorder``, ``.storage_alignment`` records), pytorch/caffe2/serialize/inline_container.cc (alignment).
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

__all__ = ["PICKLE_MAX_BYTES", "PICKLE_BYTES_PER_RECORD", "INFLATE_FREE_BYTES", "INFLATE_MAX_RATIO", "Archive",
           "inspect_zip"]  # fmt: skip

# data.pkl (the pickle: keys, shapes, dtypes, small Python values; ~100-200 bytes per tensor in real
# checkpoints) may inflate to at most PICKLE_MAX_BYTES plus PICKLE_BYTES_PER_RECORD per tensor record.
PICKLE_MAX_BYTES = 64 * 2**20
PICKLE_BYTES_PER_RECORD = 2**10
# Compressed members together may inflate to at most INFLATE_FREE_BYTES or INFLATE_MAX_RATIO times the
# archive's size, whichever is larger (re-zipped float weights shrink by ~10%, not by 64x).
INFLATE_FREE_BYTES = 256 * 2**20
INFLATE_MAX_RATIO = 64

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature, version, flags, method, time, date, crc, sizes, name/extra
_TORCH_ALIGNMENT = 64  # torch.save's record alignment unless the archive names another (.storage_alignment)


@dataclass(frozen=True)
class Archive:
    """What :func:`inspect_zip` found: whether the tensor records may be memory-mapped (and why not),
    the byte order the records were written in and the pickle protocol of data.pkl."""

    mappable: bool
    not_mappable_because: str | None
    byteorder: str
    protocol: int
    records: int


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _data_offset(file, info: zipfile.ZipInfo) -> int:
    """Where the member's bytes start: after its local header, whose extra field may differ from the directory's."""
    file.seek(info.header_offset)
    header = file.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        return -1
    *_, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _small_record(archive: zipfile.ZipFile, info: zipfile.ZipInfo | None, limit: int = 64) -> bytes | None:
    if info is None or info.file_size > limit:
        return None
    with archive.open(info) as member:
        return member.read(limit)


def inspect_zip(path: Path) -> Archive:
    """Read the zip directory of a torch.save archive; CheckpointError when it would inflate beyond the bounds.

    Nothing is unpickled; only data.pkl's first two bytes (the protocol) and the tiny ``byteorder`` and
    ``.storage_alignment`` records are read.
    """
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            infos = archive.infolist()
            pickles = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
            if not pickles:
                raise CheckpointError(f"{path} is a zip archive but not a torch.save checkpoint (no data.pkl inside)")
            pickled = min(pickles, key=lambda i: i.filename.count("/"))
            root = pickled.filename[: -len("data.pkl")]
            by_name = {i.filename: i for i in infos}
            records = [i for i in infos if i.filename.startswith(root + "data/")]
            _check_bounds(path, infos, pickled, records)

            with archive.open(pickled) as member:
                head = member.read(2)
            protocol = head[1] if len(head) == 2 and head[0] == 0x80 else 0
            byteorder = (_small_record(archive, by_name.get(root + "byteorder")) or b"little").decode(
                "ascii", "replace"
            )
            alignment_text = _small_record(archive, by_name.get(root + ".storage_alignment"))
            alignment = int(alignment_text) if alignment_text and alignment_text.isdigit() else _TORCH_ALIGNMENT
            reason = None
            for info in records:
                if info.compress_type != zipfile.ZIP_STORED:
                    reason = f"record {info.filename} is compressed ({_method(info.compress_type)})"
                    break
                offset = _data_offset(raw, info)
                if alignment <= 0 or offset < 0 or offset % alignment:
                    reason = f"record {info.filename} is not {alignment}-byte aligned in the file (offset {offset})"
                    break
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as error:
        raise CheckpointError(
            f"{path} is a truncated or corrupt zip archive ({error}); re-save or re-download it"
        ) from None
    return Archive(reason is None, reason, byteorder, protocol, len(records))


def _method(compress_type: int) -> str:
    return {zipfile.ZIP_DEFLATED: "DEFLATE", zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}.get(
        compress_type, f"method {compress_type}"
    )


def _check_bounds(path: Path, infos: list[zipfile.ZipInfo], pickled: zipfile.ZipInfo, records: list) -> None:
    pickle_limit = PICKLE_MAX_BYTES + PICKLE_BYTES_PER_RECORD * len(records)
    if pickled.file_size > pickle_limit:
        raise CheckpointError(
            f"{path}: its pickle {pickled.filename} would inflate to {_mib(pickled.file_size)} (stored in "
            f"{_mib(pickled.compress_size)}), more than the {_mib(pickle_limit)} allowed for {len(records)} tensor "
            "records; a real checkpoint's pickle is far smaller: the file is damaged or a zip bomb, not loaded"
        )
    size = path.stat().st_size
    inflated = sum(i.file_size for i in infos if i.compress_type != zipfile.ZIP_STORED)
    limit = max(INFLATE_FREE_BYTES, INFLATE_MAX_RATIO * size)
    if inflated > limit:
        raise CheckpointError(
            f"{path}: its compressed members would inflate to {_mib(inflated)} from a {_mib(size)} file, more than "
            f"the {_mib(limit)} allowed ({INFLATE_MAX_RATIO}x the file size); the file is a zip bomb or damaged, "
            "not loaded: if it is real, re-save it with torch.save (which stores records uncompressed)"
        )
