"""Rewriting a saved checkpoint so that it belongs to the converted model.

The data flows one way: checkpoint -> state dict -> architecture skeleton -> plan
-> rewritten state dict -> atomic write. A state dict is rewritten by loading it into the architecture
built on the meta device with ``load_state_dict(assign=True)`` (the checkpoint's own memory-mapped tensors
become the parameters, nothing is copied), planning that model once (``wsconvert.make_plan``: one walk, at most
one probe), applying the plan in place (conv weights keep their identity, GroupNorm reuses the BatchNorm's affine
parameters) and taking its ``state_dict()``. The result therefore has exactly the keys of
``convert_model(arch(), options)`` and the tensors of the input. Which state dicts a file holds, where its
wsconvert record lives and what the output looks like is its layout's business (wsconvert.checkpoint.layouts: one
registered handler per layout); ``convert_checkpoint`` asks the registry once and writes every layout's files
through one atomic write path.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..convert import bake as bake_model
from ..errors import CheckpointError, InvalidOptionError
from ..plan import make_plan
from ..preserve.calibrate import load_calibration_file
from ..report import ConversionReport
from . import keys as key_maps
from . import reader as ckpt
from .layouts import _SHOWN, WHOLE_MODEL_FORMAT, Output, _described, _jsonable, _listed, _short, layout_of

__all__ = [
    "WHOLE_MODEL_FORMAT",
    "CheckpointConversion",
    "EntryResult",
    "convert_checkpoint",
    "rewrite_state_dict",
    "validate_state_dict",
]


@dataclass
class EntryResult:
    """One rewritten model state dict: where it was (``key`` None: the file itself), its key prefix, and the
    rename rules that mapped its keys onto the architecture's (``key_maps.match_keys``; the output uses the
    architecture's names)."""

    key: str | None
    prefix: str
    tensors: int
    kept_keys: list[str] = field(default_factory=list)
    renamed: list[str] = field(default_factory=list)


@dataclass
class CheckpointConversion:
    """What ``convert_checkpoint`` did: the library's ConversionReport plus the checkpoint-level facts."""

    input: Path
    output: Path | None
    written: bool
    layout: str
    format: str
    arch: str | None
    arch_kwargs: dict[str, Any]
    bake: bool
    report: ConversionReport
    entries: list[EntryResult] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    would_refuse: str | None = None  # dry run: why the real run would refuse to write (e.g. the output exists)

    def to_dict(self) -> dict:
        """A JSON-serializable dict (what ``wsconvert --json`` prints)."""
        return {
            "input": str(self.input),
            "output": str(self.output) if self.output else None,
            "written": self.written,
            "layout": self.layout,
            "format": self.format,
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "bake": self.bake,
            "entries": [
                {"key": e.key, "prefix": e.prefix, "tensors": e.tensors, "kept_keys": list(e.kept_keys)}
                | ({"renamed": list(e.renamed)} if e.renamed else {})  # the rename rules, when keys were renamed
                for e in self.entries
            ],
            "kept": list(self.kept),
            "dropped": [{"key": k, "reason": r} for k, r in self.dropped],
            "notes": list(self.notes),
            "would_refuse": self.would_refuse,
            "report": self.report.to_dict(),
        }

    def __str__(self) -> str:
        lines = [str(self.report), "", f"Checkpoint: {self.input} ({self.layout}, {self.format})"]
        if self.arch:
            lines.append(
                f"  architecture: {self.arch}" + (f" {json.dumps(self.arch_kwargs)}" if self.arch_kwargs else "")
            )
        for entry in self.entries:
            where = "the whole file" if entry.key is None else repr(entry.key)
            prefix = f", key prefix {entry.prefix!r}" if entry.prefix else ""
            lines.append(f"  rewritten: {where} ({entry.tensors} tensors{prefix})")
            if entry.kept_keys:
                lines.append(f"    kept as is (outside the model): {', '.join(entry.kept_keys)}")
            for rule in entry.renamed[:_SHOWN]:
                lines.append(f"    keys renamed to the architecture's: {rule}")
            if len(entry.renamed) > _SHOWN:
                lines.append(f"    +{len(entry.renamed) - _SHOWN} more rename rules (--json lists them all)")
        if self.kept:
            lines.append(f"  kept unchanged: {', '.join(self.kept)}")
        for key, reason in self.dropped:
            lines.append(f"  dropped: {key!r} ({reason})")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.bake:
            lines.append("  baked: standardized weights stored as plain conv weights (for inference/export)")
        if self.written:
            lines.append(f"Wrote {self.output}")
        elif self.would_refuse:
            lines.append(f"Dry run: nothing written; the real run would refuse: {self.would_refuse}")
        else:
            lines.append(f"Dry run: nothing written (would write {self.output})")
        return "\n".join(lines)


# --- one state dict ------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _shape_or_none(t: object) -> list[int] | None:
    """A tensor's shape, or None where it has none to compare (nested tensors; refused by validate_state_dict)."""
    try:
        return list(t.shape)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return None


def _mismatch_error(
    where: str,
    arch: str,
    keymap: key_maps.KeyMap,
    shapes: Mapping[str, Any],
    expected: Mapping[str, Any],
) -> CheckpointError:
    """The one-line refusal of a state dict whose keys do not map onto ``arch`` (``key_maps.match_keys``), with a
    hint that says what the keys look like: another architecture, the right one with a different number of
    classes, or the right one under a prefix or renaming that wsconvert could not resolve (an example pair)."""
    parts = []
    if keymap.ambiguous:
        parts.append(f"ambiguous renaming: {'; '.join(keymap.ambiguous[:_SHOWN])}")
    if keymap.unsupported:
        parts.append(f"keys converted by tensor operations: {_listed(keymap.unsupported)}")
    if keymap.missing:
        parts.append(f"missing keys {_listed(keymap.missing)}")
    if keymap.unexpected:
        parts.append(f"unexpected keys {_listed(keymap.unexpected)}")
    sizes = keymap.sizes
    for key, got, want in sizes[:_SHOWN]:
        parts.append(f"size mismatch for {key}: {got} in the checkpoint, {want} in the architecture")
    if len(sizes) > _SHOWN:
        parts.append(f"+{len(sizes) - _SHOWN} more size mismatches")
    total = len(expected)
    matched = len(keymap.pairs)
    example = key_maps.closest_pair(keymap, shapes, expected)
    pair = f"checkpoint {_short(example[0])!r} vs architecture {_short(example[1])!r}" if example else ""
    tail = set(list(expected)[-2:])
    classes = {got[0] for key, got, want in sizes if key in tail and got[1:] == want[1:] and got[:1] != want[:1]}
    if keymap.ambiguous:
        hint = (
            f"the keys look like {arch} under a renaming that pairs some keys more than one way, and wsconvert never "
            "guesses between tensors: rename those keys in the checkpoint (load it, rename, save) to the "
            "architecture's names"
        )
    elif keymap.unsupported:
        hint = (
            f"the keys look like {arch}, saved in a format its library's loader converts with tensor operations: "
            "load the checkpoint with the library (e.g. from_pretrained), then save model.state_dict() and convert that"
        )
    elif matched == 0:
        hint = f"none of its keys belong to {arch}: the keys look like another architecture; check --arch"
        if pair:
            hint += f" (closest names: {pair})"
    elif len(classes) == 1 and len(sizes) == len([k for k, _, _ in sizes if k in tail]):
        hint = f"likely a different number of classes: try --arch-kwargs '{{\"num_classes\": {classes.pop()}}}'"
    elif 2 * matched >= total and pair and not sizes:
        hint = (
            f"{matched} of {total} keys match, so the keys look like {arch} with a prefix or renaming wsconvert could "
            f"not resolve, e.g. {pair}: rename those keys in the checkpoint (load it, rename, save), or load it "
            "with the model's library and save model.state_dict()"
        )
    elif 2 * matched >= total and sizes:
        hint = (
            f"the names are those of {arch}, {len(sizes)} shapes are not: likely another configuration of the model "
            "(depth, width, classes); check --arch and --arch-kwargs"
        )
    elif 2 * matched >= total and not keymap.unexpected:
        hint = (
            f"every key of the checkpoint belongs to {arch}, which has {len(keymap.missing)} more: likely a smaller "
            "configuration of the model or a partial save; check --arch and --arch-kwargs"
        )
    elif 2 * matched >= total:
        hint = "is --arch (with --arch-kwargs) the model this checkpoint was saved from?"
    else:
        hint = (
            f"only {matched} of {total} keys of {arch} match: the keys look like another architecture (or another "
            f"configuration of it{'; closest names: ' + pair if pair else ''}); check --arch and --arch-kwargs"
        )
    return CheckpointError(f"{where} does not match {arch}: {'; '.join(parts)}; {hint}")


def _prefixed_metadata(source: Mapping | None, converted: Mapping | None, prefix: str) -> OrderedDict:
    metadata: OrderedDict = OrderedDict()
    base = prefix[:-1] if prefix.endswith(".") else prefix
    for key, value in (source or {}).items():
        if not prefix or not (key == base or key.startswith(prefix)):
            metadata[key] = value
    for key, value in (converted or {}).items():
        metadata[(prefix + key) if key else base] = value
    return metadata


def validate_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    where: str = "the state dict",
    expected: Mapping[str, torch.Tensor] | None = None,
    prefix: str = "",
    arch: str = "the architecture",
) -> None:
    """Refuse a state dict whose contents the rewrite cannot use, naming the key, the value and what to do.

    Checked in one place, before anything is loaded: ``_metadata`` has the shape ``state_dict()`` gives it
    (torch/nn/modules/module.py: a dict of module path -> dict such as ``{"version": 1}``); every tensor of
    the model (keys under ``prefix``) is a dense strided tensor (not sparse, quantized or nested); where the
    architecture keeps a floating-point tensor (weights, norm parameters, running statistics) the file holds a
    real floating-point one (not bool, integer or complex). Keys outside ``prefix`` are kept as they are.
    """
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        fix = "delete it (del state_dict._metadata) or re-save the model's own state_dict()"
        if not isinstance(metadata, Mapping):
            raise CheckpointError(
                f"{where}: its _metadata is {_described(metadata)}, not the dict of per-module versions that "
                f"state_dict() records; {fix}"
            )
        for key, value in metadata.items():
            if not isinstance(key, str):
                raise CheckpointError(
                    f"{where}: its _metadata has the key {_described(key)}; its keys are module paths (str): {fix}"
                )
            if not isinstance(value, Mapping):
                raise CheckpointError(
                    f"{where}: its _metadata[{_short(key)!r}] is {_described(value)}, not a dict such as "
                    f"{{'version': 1}}; {fix}"
                )
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        if value.layout != torch.strided or value.is_quantized or value.is_nested:
            kind = "quantized" if value.is_quantized else "nested" if value.is_nested else "sparse"
            remedy = "value.dequantize()" if value.is_quantized else "value.to_dense()"
            raise CheckpointError(
                f"{where}: {_short(key)} is {_described(value)} ({kind}); wsconvert rewrites dense float weights: "
                f"store {remedy} under that key and re-save"
            )
        want = None if expected is None else expected.get(key[len(prefix) :])
        if want is not None and want.is_floating_point() and not value.is_floating_point():
            raise CheckpointError(
                f"{where}: {_short(key)} is {_described(value)}, but {arch} keeps {want.dtype} values there; "
                "store a floating-point tensor (e.g. value.float()) or re-save the model's own state_dict()"
            )


def rewrite_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    skeleton: nn.Module,
    options: Mapping[str, Any],
    *,
    bake: bool = False,
    where: str = "the state dict",
    arch: str = "the architecture",
    release: Callable[[], object] | None = None,
    calibration_data: list[torch.Tensor] | None = None,
) -> tuple[OrderedDict, ConversionReport, EntryResult]:
    """Rewrite one model state dict for ``convert_model(arch(), **options)`` (baked with ``bake=True``).

    ``skeleton`` is a fresh, unconverted instance of the architecture (meta device preferred); it is
    consumed. Keys outside the model's prefix (e.g. AveragedModel's ``n_averaged``) are kept as they are.
    ``release`` (drop the memory-mapped input's resident pages) is called while baking. With
    ``calibration_data`` (``preserve=True``; the skeleton must then hold real tensors) the GroupNorm affines
    are fitted on it and ``report.fidelity`` is filled (wsconvert.preserve.calibrate). The keys are mapped onto
    the architecture's by ``key_maps.match_keys`` (the leading prefix, the model library's load-time renaming, inner
    prefixes found by one consistent rule); renamed keys are written under the architecture's names, the leading
    prefix is put back. Raises CheckpointError naming the first missing, unexpected, size-mismatched and ambiguous
    keys, with a hint that says what the keys look like.
    """
    expected = skeleton.state_dict()
    shapes = {k: _shape_or_none(v) for k, v in state_dict.items()}
    wanted = {k: _shape(v) for k, v in expected.items()}
    keymap = key_maps.match_keys(shapes, wanted, key_maps.library_renaming(skeleton))
    prefix = keymap.prefix
    as_named = {key[len(prefix) :]: expected[target] for key, target in keymap.pairs.items()}
    validate_state_dict(state_dict, where, as_named, prefix, arch)
    if keymap.ambiguous or keymap.unsupported or keymap.sizes or keymap.unexpected or not keymap.pairs:
        raise _mismatch_error(where, arch, keymap, shapes, wanted)
    kept = keymap.kept
    own = OrderedDict((keymap.pairs[k], v) for k, v in state_dict.items() if k in keymap.pairs)
    # Missing keys are what load_state_dict says: modules may fill some themselves (BatchNorm's num_batches_tracked,
    # absent from FrozenBatchNorm2d-trained checkpoints: torch/nn/modules/batchnorm.py _load_from_state_dict).
    result = skeleton.load_state_dict(own, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        keymap.missing, keymap.unexpected = list(result.missing_keys), list(result.unexpected_keys)
        raise _mismatch_error(where, arch, keymap, shapes, wanted)
    plan = make_plan(skeleton, **options, calibration_data=calibration_data)  # the one walk (and probe) of the model
    model = plan.apply(skeleton, inplace=True)
    report = plan.report if calibration_data is None else plan.build_report(plan.fidelity)
    if bake:
        model = _bake(model, release)
    converted = model.state_dict()
    unset = [k for k, v in converted.items() if v.is_meta]
    if unset:
        raise CheckpointError(
            f"{where} lacks values for {_listed(unset)}, which {arch} keeps in its state dict; "
            "save the checkpoint from the same model version"
        )
    out: OrderedDict = OrderedDict((k, state_dict[k]) for k in kept)
    for key, value in converted.items():
        out[prefix + key] = value
    out._metadata = _prefixed_metadata(  # type: ignore[attr-defined]
        getattr(state_dict, "_metadata", None), getattr(converted, "_metadata", None), prefix
    )
    return out, report, EntryResult(None, prefix, len(converted), kept, keymap.renamed())


def _bake(model: nn.Module, release: Callable[[], object] | None) -> nn.Module:
    """``bake(model, inplace=True)``, one conv at a time, releasing the input's read pages as it goes.

    Baking reads every conv weight of the mapped file and allocates its standardized copy; without the
    release the read pages would stay resident too (two file sizes instead of one).
    """
    if release is None:
        return bake_model(model, inplace=True)
    pending = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            pending += module.parametrizations.weight.original.nbytes
            bake_model(module, inplace=True)
            if pending >= ckpt.RELEASE_EVERY_BYTES:
                release()
                pending = 0
    model = bake_model(model, inplace=True)
    release()
    return model


# --- whole files ---------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``b`` names the file ``a`` (the same path after symlinks, or the same inode: hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):  # never raises, also for symlink loops
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # b (or a) does not exist or cannot be checked: not the same file
        return False


def convert_checkpoint(
    input: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    bake: bool = False,
    dry_run: bool = False,
    force: bool = False,
    trust_pickle: bool = False,
    progress: Callable[[str], None] | None = None,
    on_bytes: Callable[[int, int], None] | None = None,
    calibration: str | os.PathLike | None = None,
) -> CheckpointConversion:
    """Convert the checkpoint at ``input`` and write it (same layout) to ``output``.

    ``options`` are ``convert_model``'s keyword arguments. ``calibration`` is a file of inputs (torch.save,
    safetensors or .npy; needs ``options["preserve"]``) to fit the GroupNorm affines on (docs/preserve.md).
    The default output is ``<stem>.ws<suffix>`` beside the input (a directory: ``<name>.ws``); the input is never
    modified and an existing output is replaced only with ``force``. The input's layout
    (wsconvert.checkpoint.layouts) says which state dicts to rewrite and what to write; a ``save_pretrained``
    directory is written as a new directory (wsconvert.checkpoint.directory). Returns what was done; raises a
    WSConvertError subclass for every expected failure, leaving no output file behind.
    """
    say = progress or (lambda message: None)
    options = _jsonable(dict(options or {}))
    source = Path(input)
    target = Path(output) if output is not None else ckpt.default_output_path(source)
    directory = ckpt.not_a_regular_file(source) == "a directory"
    if directory:
        ckpt.check_input_directory(source)
        _check_not_nested(source, target)
    else:
        ckpt.check_input(source)  # before anything else: a FIFO, device or symlink loop is never opened
    identity = ckpt.FileIdentity.of(source)  # if the input changes before the write ends, nothing is written
    if _same_file(source, target):
        raise CheckpointError(f"output {target} is the input file; wsconvert never modifies its input, pick another -o")
    if calibration is not None and not options.get("preserve"):
        raise InvalidOptionError(
            "--calibration fits the GroupNorm affines of a function-preserving conversion: add --preserve"
        )

    say(f"loading {source}")
    loaded = ckpt.load_checkpoint(source, trust_pickle=trust_pickle)
    layout = layout_of(loaded)
    previous = layout.record(loaded)
    if previous is not None:
        raise CheckpointError(
            f"{source} was already converted by wsconvert {previous.get('version', '?')} with options "
            f"{json.dumps(previous.get('options', {}), sort_keys=True)}; convert the original checkpoint instead"
        )
    notes: list[str] = []
    info = {"version": _version(), "options": options, "bake": bake, "source": source.name}
    if calibration is not None:
        info["calibration"] = Path(calibration).name

    architecture = layout.architecture(loaded, arch, arch_kwargs, notes)
    # Calibration runs the model: it needs real tensors (non-persistent buffers stay meta on a skeleton).
    batches = None
    if calibration is not None:
        batches = load_calibration_file(calibration, layout.calibration_model(loaded, architecture))
    say(f"planning on {layout.subject(architecture)}")
    entries = layout.entries(loaded, architecture)
    info |= layout.record_fields(architecture, entries, bake)

    releases = loaded.mmap and layout.release_input_pages
    mapped = loaded.files or [source]

    def release_all() -> None:
        for path in mapped:
            ckpt.release_mapped_pages(path)

    release = release_all if releases else None
    results: list[EntryResult] = []
    rewritten: dict[str | None, OrderedDict] = {}
    report: ConversionReport | None = None
    for key, state_dict in entries.models.items():
        with _released_while_running(release):
            out, entry_report, result = rewrite_state_dict(
                state_dict,
                architecture.build_skeleton() if batches is None else architecture.build(),
                options,
                bake=bake and layout.bake_entries,
                where=f"{source}" if key is None else f"{source} entry {key!r}",
                arch=architecture.describe(),
                release=release,
                calibration_data=batches,
            )
        result.key = key
        results.append(result)
        rewritten[key] = out
        report = report or entry_report
    if release is not None:  # pages a probe's forward pass read stay resident otherwise, until the first write
        release()
    notes = architecture.notes + notes + layout.notes(bake)

    conversion = CheckpointConversion(
        source, target, False, layout.label, layout.format, architecture.spec, architecture.kwargs, bake,
        report, results, entries.kept, entries.dropped, notes,
    )  # fmt: skip
    writes_directory = bool(getattr(layout, "writes_directory", False))
    conversion.would_refuse = _check_output(target, force, dry_run, directory=writes_directory)
    if dry_run:
        return conversion
    say(f"writing {target}")
    outputs = layout.assemble(loaded, rewritten, info, calibration_data=batches)
    if writes_directory:
        files = layout.files(loaded, outputs, info)  # type: ignore[attr-defined]
        _write_directory(outputs, files, target, force=force, on_bytes=on_bytes, release=release, loaded=loaded)
    else:
        _write(outputs, target, force=force, on_bytes=on_bytes, release=source if releases else None, source=identity)
    conversion.written = True
    return conversion


@contextlib.contextmanager
def _released_while_running(release: Callable[[], None] | None) -> Iterator[None]:
    """While planning: drop the input's read pages after every RELEASE_EVERY_BYTES of weights a forward pass ran.

    A probe (or calibration) that runs the model reads every weight of the memory-mapped input; those pages
    would stay resident until the write starts, so peak memory would be the whole model. A global forward hook
    (``torch.nn.modules.module.register_module_forward_hook``) counts the bytes of each module run and calls
    ``release`` (reader.release_mapped_pages) when enough accumulated.
    """
    if release is None:
        yield
        return
    pending = 0

    def hook(module: nn.Module, args: object, output: object) -> None:
        nonlocal pending
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            pending += tensor.nbytes
        if pending >= ckpt.RELEASE_EVERY_BYTES:
            release()
            pending = 0

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _check_not_nested(source: Path, target: Path) -> None:
    """Refuse a directory output inside its input directory, or an input inside the output: the input is never
    modified (also not by adding a directory to it) and ``--force`` never replaces what holds the input."""
    inside, outside = os.path.realpath(target), os.path.realpath(source)
    if inside == outside:
        return  # the same path: _same_file's message
    if os.path.commonpath([inside, outside]) == outside:
        raise CheckpointError(
            f"output {target} is inside the input directory {source}; wsconvert never modifies its input, "
            "pick an -o outside it"
        )
    if os.path.commonpath([inside, outside]) == inside:
        raise CheckpointError(f"output {target} holds the input directory {source}; pick another -o")


def _write_directory(
    outputs: list[Output],
    files: list[tuple[str, bytes | Path]],
    target: Path,
    *,
    force: bool,
    on_bytes: Callable[[int, int], None] | None,
    release: Callable[[], None] | None,
    loaded: ckpt.Loaded,
) -> None:
    """Write a directory output: every safetensors ``Output`` and every file (bytes, or a path to copy) into one
    temporary directory published atomically (reader.write_directory_atomic). The input's mapped pages are
    released after each shard, so that memory holds about one shard, not the model; nothing is published when an
    input file changed meanwhile."""
    import shutil

    from safetensors.torch import save_file

    sources = [ckpt.FileIdentity.of(p) for p in [loaded.path / "config.json", *loaded.files]]
    identities = [identity for identity in sources if identity is not None]
    total = sum(_tensor_bytes(output.obj) for output in outputs)
    done = 0
    with ckpt.write_directory_atomic(
        target, force=force, sources=identities, sigbus_source=ckpt.FileIdentity.of(loaded.path)
    ) as tmp:
        mode = _new_file_mode(tmp)
        for output in outputs:
            flat = {k: (v if v.is_contiguous() else v.contiguous()) for k, v in output.obj.items()}
            try:
                save_file(flat, str(tmp / output.name), metadata=output.metadata)
            except Exception as error:  # safetensors' own: a full disk, tensors sharing memory, ...
                failure = ckpt._write_failure(target / output.name, error, None)
                if failure is error:
                    failure = CheckpointError(f"cannot write safetensors file {target / output.name}: {error}")
                raise failure from None
            os.chmod(tmp / output.name, mode)  # safetensors creates its file private (0o600)
            del flat
            if release is not None:
                release()
            done += _tensor_bytes(output.obj)
            if on_bytes is not None:
                on_bytes(done, total)
        for name, content in files:
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            else:
                (tmp / name).write_bytes(content)


def _new_file_mode(directory: Path) -> int:
    """The mode a new file in ``directory`` gets (0o666 less the umask), read from a file created there."""
    probe = directory / ".mode"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        return os.stat(probe).st_mode & 0o777
    finally:
        os.unlink(probe)


def _check_output(target: Path, force: bool, dry_run: bool, *, directory: bool = False) -> str | None:
    """Refuse an output the write would refuse (exists without ``force``, a directory, ...), once the input and
    the architecture have been validated: a wrong ``--arch`` is reported first, not hidden behind "pass --force".
    A dry run returns the refusal instead (it is reported, the exit code stays 0). ``directory``: the output is a
    directory (reader.check_output_directory)."""
    try:
        if directory:
            ckpt.check_output_directory(target, force=force)
        else:
            ckpt.check_output_target(target, force=force)
    except CheckpointError as error:
        if dry_run:
            return str(error)
        raise
    return None


def _tensor_bytes(obj: Any) -> int:
    seen: set[int] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, Mapping):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(obj)
    return total


def _write(
    outputs: list[Output],
    target: Path,
    *,
    force: bool,
    on_bytes: Callable[[int, int], None] | None,
    release: Path | None,
    source: ckpt.FileIdentity | None,
) -> None:
    """The one write path: each output, atomically, at ``target`` (or ``target/name``); nothing is published
    when the input changed meanwhile (``source``). ``release`` names the memory-mapped input whose read pages
    are dropped while torch.save writes (reader.release_mapped_pages)."""
    for output in outputs:
        path = target if output.name is None else target / output.name
        if output.format == "safetensors":
            ckpt.write_safetensors(output.obj, path, output.metadata, force=force, source=source)
            continue
        ckpt.write_torch(
            output.obj, path, force=force, on_bytes=_progress(output.obj, on_bytes), release=release, source=source
        )


def _progress(obj: Any, on_bytes: Callable[[int, int], None] | None) -> Callable[[int], None] | None:
    """``on_bytes(done, total)`` as write_torch's ``on_bytes(done)``, ``total`` being the tensor bytes in ``obj``."""
    if on_bytes is None:
        return None
    total = _tensor_bytes(obj)
    return lambda done: on_bytes(done, total)


def _version() -> str:
    from .. import __version__

    return __version__
