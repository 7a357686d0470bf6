"""Hugging Face ``save_pretrained`` directories: config.json plus one weights file or shards and their index.

transformers writes ``config.json`` (the model class under ``architectures``, its ``model_type`` and every
attribute of the config) and the weights as ``model.safetensors``, or, above ``max_shard_size``, as
``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` (``{"metadata": {"total_size":
...}, "weight_map": {key: shard file}}``); older versions wrote ``pytorch_model.bin`` (and its ``.index.json``)
(transformers ``PreTrainedModel.save_pretrained``, ``modeling_utils._get_resolved_checkpoint_files``). Other files
(``generation_config.json``, ``preprocessor_config.json``, tokenizer files, README.md) sit beside them.

Reading (:func:`read_directory`): every top-level entry is checked like a file input (symlinks to regular files are
followed, as in the Hub cache whose snapshots are links to blobs; FIFOs, sockets, devices, dangling links and link
loops are refused), config.json is parsed (bounded), the index's shard names are validated (plain file names
inside the directory: no ``/``, ``..`` or absolute paths) and its keys must equal the shards' keys. The shards are
memory-mapped, not read: the merged state dict costs no memory until written.

Writing (:class:`TransformersDirectoryLayout`, through ``rewrite.convert_checkpoint``): a new directory, published
atomically (``reader.write_directory_atomic``), holding config.json with the wsconvert record, the converted weights
under names transformers does not load (``wsconvert-model.safetensors``, or ``wsconvert-model-0000k-of-0000n``
shards grouped like the input's plus ``wsconvert-model.safetensors.index.json``) and a copy of every other file a
user needs. config.json also sets ``transformers_weights`` (the file transformers' ``from_pretrained`` loads when
the config names one) to a sentence that is not a weights file: ``from_pretrained`` on the output raises an
error naming wsconvert instead of building the unconverted model. :func:`load_pretrained` is the loader.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArchitectureError, CheckpointError
from . import reader as ckpt
from .arch import Architecture, arch_from_config, resolve_arch
from .layouts import Entries, Layout, Output, _jsonable, _listed, checked_record, register_layout

__all__ = [
    "DIRECTORY_FORMAT",
    "OUTPUT_INDEX",
    "OUTPUT_WEIGHTS",
    "DirectoryCheckpoint",
    "TransformersDirectoryLayout",
    "load_pretrained",
    "read_directory",
]

CONFIG_NAME = "config.json"
# The weights transformers loads, in its order of preference: (single file, index of shards).
INPUT_WEIGHTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
# What wsconvert writes instead: names transformers' from_pretrained never picks up.
OUTPUT_WEIGHTS = "wsconvert-model.safetensors"
OUTPUT_INDEX = "wsconvert-model.safetensors.index.json"
DIRECTORY_FORMAT = "wsconvert-save-pretrained"
# config.json's ``transformers_weights`` in the output: transformers refuses a value that is not a .safetensors name.
FROM_PRETRAINED_GUARD = (
    "converted by wsconvert: its weights belong to the converted model, which from_pretrained cannot build; "
    "load it with wsconvert.checkpoint.directory.load_pretrained(path)"
)
GUARD_KEY = "transformers_weights"
# Bounds on the JSON files read (real config.json files are a few KiB, indexes a few MiB).
CONFIG_MAX_BYTES = 16 * 2**20
INDEX_MAX_BYTES = 256 * 2**20

# Files never copied to the output: weights in any format (they would hold the unconverted model) and training state.
_WEIGHT_FILE = re.compile(
    r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|onnx|gguf|tflite|ot|pdparams|npz)$|.*\.index\.json$", re.IGNORECASE
)


@dataclass
class DirectoryCheckpoint:
    """A ``save_pretrained`` directory as read: its config, the merged (memory-mapped) state dict, which weights
    file holds each key, and the other files to copy (``copied``) or leave out (``left_out``: name, reason)."""

    path: Path
    config: dict[str, Any]
    state_dict: OrderedDict
    weights: list[str] = field(default_factory=list)
    index: str | None = None
    shard_of: dict[str, str] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)


# --- reading ---------------------------------------------------------------------------------------


def _scan(path: Path) -> dict[str, str | None]:
    """Every top-level entry of ``path`` -> None (a regular file, symlinks followed) or "a directory"; any other
    kind (FIFO, socket, device, dangling symlink, symlink loop, inaccessible) is refused before anything is opened."""
    try:
        names = sorted(os.listdir(path))
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    entries: dict[str, str | None] = {}
    for name in names:
        kind = ckpt.not_a_regular_file(path / name)
        if kind is not None and kind.startswith("inaccessible"):
            raise CheckpointError(f"cannot read {path / name}: {kind[len('inaccessible (') : -1]}")
        if kind not in (None, "a directory"):
            raise CheckpointError(
                f"{path / name} is {kind}, not a regular file; a save_pretrained directory holds files only: "
                "remove it from the directory (or convert a copy without it)"
            )
        entries[name] = kind
    return entries


def _read_json(path: Path, what: str, limit: int) -> Any:
    size = ckpt.check_input(path)
    if size > limit:
        raise CheckpointError(f"{path} is {size:,} bytes, more than the {limit:,} a {what} may have; is it damaged?")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is not a UTF-8 {what} ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            f"restore the {what} written by save_pretrained"
        ) from None


def read_config(path: Path) -> dict[str, Any]:
    """config.json of the directory ``path`` as a dict, or one CheckpointError (missing, not JSON, not an object)."""
    config_path = path / CONFIG_NAME
    if ckpt.not_a_regular_file(config_path) == "missing":
        raise CheckpointError(
            f"{path} is a directory without {CONFIG_NAME}, so not a save_pretrained directory; give the checkpoint "
            f"file inside it (e.g. {path / 'model.safetensors'}) with --arch"
        )
    config = _read_json(config_path, "config.json", CONFIG_MAX_BYTES)
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{config_path} holds a JSON {type(config).__name__}, not an object of config attributes; restore the "
            "config.json written by save_pretrained"
        )
    return config


def _shard_name_problem(name: object) -> str | None:
    """Why ``name`` (a weight_map value) is not a plain file name inside the directory, or None."""
    if not isinstance(name, str) or not name:
        return "not a file name"
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
        return "a path, not a file name inside the directory (no '/', '..' or absolute paths)"
    return None


def _read_weight_file(path: Path, trust_pickle: bool) -> Mapping[str, torch.Tensor]:
    loaded = ckpt.load_checkpoint(path, trust_pickle=trust_pickle)
    if loaded.kind != "state_dict":
        raise CheckpointError(
            f"{path} holds a {loaded.kind.replace('_', ' ')}, not a state dict of tensors; a save_pretrained weights "
            "file maps parameter names to tensors"
        )
    return loaded.obj


def read_weights(
    path: Path, entries: Mapping[str, str | None], single: str, index: str, *, trust_pickle: bool = False
) -> tuple[OrderedDict, dict[str, str], list[str], str | None]:
    """The weights of the directory ``path``: ``single`` when present, else the shards that ``index`` names.

    Returns (merged state dict, key -> file, files read, index name or None). The index must be
    ``{"weight_map": {key: file}}`` with plain file names of regular files in the directory, and its keys must be
    exactly the shards' keys (CheckpointError naming the first missing and extra keys otherwise).
    """
    if single in entries and entries[single] is None:
        state_dict = OrderedDict(_read_weight_file(path / single, trust_pickle))
        return state_dict, dict.fromkeys(state_dict, single), [single], None
    if index not in entries:
        raise CheckpointError(f"{path} holds neither {single or 'a weights file'} nor {index}; nothing to read")
    index_path = path / index
    document = _read_json(index_path, "weights index", INDEX_MAX_BYTES)
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index_path} has no 'weight_map' object of parameter name -> shard file; restore the index written "
            "by save_pretrained"
        )
    for key, name in weight_map.items():
        problem = _shard_name_problem(name)
        if problem:
            raise CheckpointError(
                f"{index_path} maps {key!r} to {name!r}, which is {problem}; the index is damaged or was not written "
                "by save_pretrained: nothing was read"
            )
    shards = sorted(set(weight_map.values()))
    for name in shards:
        kind = entries.get(name, "missing")
        if kind is not None:
            raise CheckpointError(
                f"{index_path} names the shard {name}, but {path / name} is {kind}; copy every shard of the save "
                "into the directory"
            )
    state_dict: OrderedDict = OrderedDict()
    shard_of: dict[str, str] = {}
    for name in shards:
        tensors = _read_weight_file(path / name, trust_pickle)
        listed = {k for k, v in weight_map.items() if v == name}
        extra = [k for k in tensors if k not in listed]
        missing = [k for k in listed if k not in tensors]
        if extra or missing:
            said = []
            if missing:
                said.append(f"the index maps {_listed(missing)} to it, but it does not hold them")
            if extra:
                said.append(f"it holds {_listed(extra)}, which the index does not map to it")
            raise CheckpointError(
                f"{path / name} and {index} disagree: {'; '.join(said)}; re-save the model with save_pretrained"
            )
        for key, tensor in tensors.items():
            state_dict[key] = tensor
            shard_of[key] = name
    return state_dict, shard_of, shards, index


def read_directory(path: str | os.PathLike, *, trust_pickle: bool = False) -> ckpt.Loaded:
    """Read a ``save_pretrained`` directory (see the module docstring) as a ``Loaded`` of kind "directory" whose
    ``obj`` is a :class:`DirectoryCheckpoint`. A directory carrying a wsconvert record (an output) is refused with
    one CheckpointError that says how to load it (:func:`load_pretrained`) and that converting it again is not done."""
    path = Path(path)
    ckpt.check_input_directory(path)
    entries = _scan(path)
    config = read_config(path)
    checkpoint = DirectoryCheckpoint(path, config, OrderedDict())
    if ckpt.INFO_KEY in config:  # what both converting again and wsconvert.load(path) need to hear
        record = checked_record(
            ckpt.Loaded(path, "directory", "directory", checkpoint),
            f"its {CONFIG_NAME} entry {ckpt.INFO_KEY!r}",
            config[ckpt.INFO_KEY],
        )
        raise CheckpointError(
            f"{path} was already converted by wsconvert {record.get('version', '?')} with options "
            f"{json.dumps(record.get('options', {}), sort_keys=True)}: load it with "
            f"wsconvert.checkpoint.directory.load_pretrained({str(path)!r}); to convert again, convert the original "
            "directory"
        )
    for single, index in INPUT_WEIGHTS:
        if single in entries or index in entries:
            state_dict, shard_of, weights, index_name = read_weights(
                path, entries, single, index, trust_pickle=trust_pickle
            )
            checkpoint.state_dict, checkpoint.shard_of = state_dict, shard_of
            checkpoint.weights, checkpoint.index = weights, index_name
            break
    else:
        found = ", ".join(name for name, kind in entries.items() if kind is None) or "nothing"
        raise CheckpointError(
            f"{path} holds no model weights that save_pretrained writes (model.safetensors, "
            f"model.safetensors.index.json with its shards, pytorch_model.bin); it holds {found}"
        )
    used = {CONFIG_NAME, *checkpoint.weights, *(x for x in [checkpoint.index] if x)}
    for name, kind in entries.items():
        if name in used:
            continue
        if kind == "a directory":
            checkpoint.left_out.append((name, "a subdirectory: only the directory's own files are copied"))
        elif _WEIGHT_FILE.match(name):
            checkpoint.left_out.append((name, "weights or training state in another file: not converted"))
        else:
            checkpoint.copied.append(name)
    files = [path / name for name in checkpoint.weights]
    return ckpt.Loaded(path, "directory", "directory", checkpoint, mmap=True, files=files)


def clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model's own config attributes: config.json without the wsconvert record and the from_pretrained guard."""
    return {k: v for k, v in config.items() if k not in (ckpt.INFO_KEY, GUARD_KEY)}


def directory_architecture(
    path: Path, config: Mapping[str, Any], arch: str | None, arch_kwargs: Mapping[str, Any] | None
) -> Architecture:
    """The model of a directory: ``--arch`` (``transformers:ClassName`` is built from config.json, ``--arch-kwargs``
    overriding its attributes), else the class config.json names (``arch.arch_from_config``)."""
    kwargs = dict(arch_kwargs or {})
    where = path / CONFIG_NAME
    if arch:
        spec = arch
    else:
        named = arch_from_config(config)
        if named is None:
            what = (
                f"has model_type {config['model_type']!r} but no 'architectures' list naming the model class"
                if isinstance(config.get("model_type"), str)
                else "names no architecture (no 'architectures' of a transformers model, no timm 'architecture')"
            )
            raise ArchitectureError(
                f"{where} {what}; pass --arch transformers:ClassName (built from this config.json), timm:NAME or "
                "package.module:callable"
            )
        spec, found = named
        kwargs = {**found, **kwargs}
    base = clean_config(config) if spec.startswith("transformers:") else None
    try:
        return resolve_arch(spec, kwargs, config=base)
    except ArchitectureError as error:
        if arch:
            raise
        raise ArchitectureError(
            f"{where} names the architecture {spec}, which cannot be built here: {error}; pass --arch"
        ) from None


# --- the layout ------------------------------------------------------------------------------------


def _group(state_dict: Mapping[str, torch.Tensor], checkpoint: DirectoryCheckpoint) -> list[OrderedDict]:
    """The output's keys grouped like the input's shards: a key stays with the input file of the same key or of the
    nearest module that file holds (``conv.parametrizations.weight.original`` goes with ``conv.weight``); empty
    groups are dropped. One group for a single-file input."""
    order = {name: i for i, name in enumerate(checkpoint.weights)}
    module_shard: dict[str, str] = {}
    for key, name in checkpoint.shard_of.items():
        module = key.rpartition(".")[0]
        while module not in module_shard:
            module_shard[module] = name
            if not module:
                break
            module = module.rpartition(".")[0]
    groups: list[OrderedDict] = [OrderedDict() for _ in checkpoint.weights] or [OrderedDict()]
    last = 0
    for key, tensor in state_dict.items():
        name = checkpoint.shard_of.get(key)
        module = key.rpartition(".")[0]
        while name is None and module:
            name = module_shard.get(module)
            module = module.rpartition(".")[0]
        index = order.get(name, last) if name is not None else last
        groups[index][key] = tensor
        last = index
    return [group for group in groups if group]


def _shard_names(count: int, sharded: bool) -> list[str]:
    if not sharded:
        return [OUTPUT_WEIGHTS]
    stem = OUTPUT_WEIGHTS.removesuffix(".safetensors")
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class TransformersDirectoryLayout(Layout):
    """A ``save_pretrained`` directory in, a converted directory out (see the module docstring).

    ``writes_directory``: ``convert_checkpoint`` writes ``assemble``'s shards and ``files()`` into one new directory
    published atomically (``reader.write_directory_atomic``) instead of one file.
    """

    name = "save_pretrained directory"
    label = "save_pretrained directory"
    format = "safetensors"
    writes_directory = True

    def matches(self, loaded: ckpt.Loaded) -> bool:
        return loaded.kind == "directory" and isinstance(loaded.obj, DirectoryCheckpoint)

    def record(self, loaded: ckpt.Loaded) -> dict | None:
        config = loaded.obj.config
        if ckpt.INFO_KEY not in config:
            return None
        return checked_record(loaded, f"its {CONFIG_NAME} entry {ckpt.INFO_KEY!r}", config[ckpt.INFO_KEY])

    def architecture(self, loaded, arch, arch_kwargs, notes) -> Architecture:  # noqa: ANN001
        architecture = directory_architecture(loaded.path, loaded.obj.config, arch, arch_kwargs)
        if not arch:
            shown = f" with {architecture.kwargs}" if architecture.kwargs else ""
            notes.append(f"architecture {architecture.spec} taken from {CONFIG_NAME}{shown}")
        notes += self.directory_notes(loaded)  # the one hook that sees the input and the notes
        return architecture

    def entries(self, loaded: ckpt.Loaded, architecture: Architecture) -> Entries:  # type: ignore[override]
        return Entries({None: loaded.obj.state_dict})

    def record_fields(self, architecture, entries, bake) -> dict[str, Any]:  # noqa: ANN001
        return {**super().record_fields(architecture, entries, bake), "format": DIRECTORY_FORMAT}

    def notes(self, bake: bool) -> list[str]:
        return [
            "directory output: load it with wsconvert.checkpoint.directory.load_pretrained(path); transformers' "
            "from_pretrained refuses it (its weights are under wsconvert-model*.safetensors)"
        ]

    def directory_notes(self, loaded: ckpt.Loaded) -> list[str]:
        """What the conversion says about the directory's files: the weights read, the files copied and left out."""
        checkpoint: DirectoryCheckpoint = loaded.obj
        out = OUTPUT_INDEX + " and its shards" if checkpoint.index else OUTPUT_WEIGHTS
        notes = [f"weights: {_listed(checkpoint.weights)} ({len(checkpoint.weights)} file(s)) -> {out}"]
        if checkpoint.copied:
            notes.append(f"copied unchanged: {', '.join(checkpoint.copied)}")
        for name, reason in checkpoint.left_out:
            notes.append(f"not copied: {name} ({reason})")
        return notes

    def assemble(self, loaded, rewritten, info, *, calibration_data=None) -> list[Output]:  # noqa: ANN001
        checkpoint: DirectoryCheckpoint = loaded.obj
        groups = _group(rewritten[None], checkpoint)
        sharded = checkpoint.index is not None
        info["weights"] = OUTPUT_INDEX if sharded else OUTPUT_WEIGHTS
        metadata = {"format": "pt", ckpt.INFO_KEY: json.dumps(info, sort_keys=True)}
        names = _shard_names(len(groups), sharded)
        return [Output(dict(group), "safetensors", metadata, name) for group, name in zip(groups, names, strict=True)]

    def files(self, loaded: ckpt.Loaded, outputs: list[Output], info: dict) -> list[tuple[str, bytes | Path]]:
        """The directory's other files: config.json with the record and the guard, the index of the shards, and the
        copied files (as their source paths)."""
        checkpoint: DirectoryCheckpoint = loaded.obj
        config = {**checkpoint.config, ckpt.INFO_KEY: _jsonable(info), GUARD_KEY: FROM_PRETRAINED_GUARD}
        files: list[tuple[str, bytes | Path]] = [(CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())]
        if info["weights"] == OUTPUT_INDEX:
            weight_map = {key: output.name for output in outputs for key in output.obj}
            total = sum(t.numel() * t.element_size() for output in outputs for t in output.obj.values())
            index = {"metadata": {"total_size": total, ckpt.INFO_KEY: info}, "weight_map": weight_map}
            files.append((OUTPUT_INDEX, (json.dumps(index, indent=2) + "\n").encode()))
        files += [(name, checkpoint.path / name) for name in checkpoint.copied]
        return files


register_layout(TransformersDirectoryLayout())


# --- loading the output ----------------------------------------------------------------------------


def load_pretrained(path: str | os.PathLike, *, map_location: Any = "cpu") -> nn.Module:
    """The converted model of a directory ``wsconvert DIR`` wrote, in eval mode (like ``from_pretrained``).

    Builds the architecture its config.json records (``transformers:ClassName`` from the config itself, random
    weights, nothing downloaded), converts it with the recorded options (``convert_model``; ``bake`` when recorded),
    and loads the weights (``wsconvert-model*.safetensors``, read like any input: names validated, memory-mapped)
    with ``load_state_dict(strict=True)``. The result computes what ``convert_model(original, options)`` computes.
    ``map_location`` is the device the model is moved to (None: leave it on the CPU).

    Raises CheckpointError for a directory without a wsconvert record (load it with transformers, or convert it
    first) or with damaged files, ArchitectureError when the recorded architecture cannot be built here.
    """
    from ..convert import bake as bake_model
    from ..convert import convert_model

    path = Path(path)
    if ckpt.not_a_regular_file(path) != "a directory":
        raise CheckpointError(f"{path} is not a directory written by wsconvert (it is {ckpt.not_a_regular_file(path)})")
    ckpt.check_input_directory(path)
    entries = _scan(path)
    config = read_config(path)
    record = config.get(ckpt.INFO_KEY)
    if record is None:
        raise CheckpointError(
            f"{path} was not written by wsconvert (its {CONFIG_NAME} has no {ckpt.INFO_KEY!r} record); load it with "
            f"transformers' from_pretrained, or convert it first: wsconvert {path} --gn 32"
        )
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("arch"), str)
        or record.get("format") != (DIRECTORY_FORMAT)
    ):
        raise CheckpointError(f"{path / CONFIG_NAME}: its {ckpt.INFO_KEY!r} record is damaged (no arch or format)")
    options = dict(record.get("options") or {})
    spec, kwargs = record["arch"], dict(record.get("arch_kwargs") or {})
    base = clean_config(config) if spec.startswith("transformers:") else None
    try:
        architecture = resolve_arch(spec, kwargs, config=base)
    except ArchitectureError as error:
        raise ArchitectureError(
            f"{path} records the architecture {spec!r}, which cannot be built here: {error}"
        ) from None
    weights = record.get("weights")
    if weights not in (OUTPUT_WEIGHTS, OUTPUT_INDEX):
        raise CheckpointError(f"{path / CONFIG_NAME}: its record names the weights {weights!r}; it may be damaged")
    if weights == OUTPUT_WEIGHTS:
        state_dict, _, files, _ = read_weights(path, entries, OUTPUT_WEIGHTS, "", trust_pickle=False)
    else:
        state_dict, _, files, _ = read_weights(path, entries, "", OUTPUT_INDEX, trust_pickle=False)
    model = convert_model(architecture.build(), **options, inplace=True)
    if record.get("bake"):
        model = bake_model(model, inplace=True)
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # a float16 / bfloat16 save: the model in that precision, as the conversion saw it
        model = model.to(dtype=dtypes.pop())
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path} does not load into {architecture.describe()} converted with {json.dumps(options)}: "
            f"{' '.join(str(error).split())[:300]}"
        ) from None
    del state_dict
    for name in files:
        ckpt.release_mapped_pages(path / name)
    from .wholemodel import moved  # wholemodel.load calls this function: imported here, not at module level

    return moved(model.eval(), map_location, caller="load_pretrained")
