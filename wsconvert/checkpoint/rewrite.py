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

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
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
    """One rewritten model state dict: where it was (``key`` None: the file itself), its key prefix."""

    key: str | None
    prefix: str
    tensors: int
    kept_keys: list[str] = field(default_factory=list)


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


def _mismatch_error(
    where: str,
    arch: str,
    matched: int,
    missing: list[str],
    unexpected: list[str],
    sizes: list[tuple[str, list[int], list[int]]],
    expected_keys: list[str],
) -> CheckpointError:
    parts = []
    if missing:
        parts.append(f"missing keys {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_listed(unexpected)}")
    for key, got, want in sizes[:_SHOWN]:
        parts.append(f"size mismatch for {key}: {got} in the checkpoint, {want} in the architecture")
    if len(sizes) > _SHOWN:
        parts.append(f"+{len(sizes) - _SHOWN} more size mismatches")
    if matched == 0:
        hint = f"none of its keys belong to {arch}: check --arch"
    else:
        tail = set(expected_keys[-2:])
        classes = {got[0] for key, got, want in sizes if key in tail and got[1:] == want[1:] and got[:1] != want[:1]}
        if len(classes) == 1 and len(sizes) == len([k for k, _, _ in sizes if k in tail]):
            hint = f"likely a different number of classes: try --arch-kwargs '{{\"num_classes\": {classes.pop()}}}'"
        else:
            hint = "is --arch (with --arch-kwargs) the model this checkpoint was saved from?"
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
    are fitted on it and ``report.fidelity`` is filled (wsconvert.preserve.calibrate).
    Raises CheckpointError naming the first missing, unexpected and size-mismatched keys.
    """
    expected = skeleton.state_dict()
    keys = list(state_dict)
    prefix, matched = ckpt.match_prefix(keys, set(expected))
    validate_state_dict(state_dict, where, expected, prefix, arch)
    own = OrderedDict((k[len(prefix) :], v) for k, v in state_dict.items() if k.startswith(prefix))
    kept = [k for k in keys if not k.startswith(prefix)]
    sizes = [
        (k, _shape(v), _shape(expected[k])) for k, v in own.items() if k in expected and v.shape != expected[k].shape
    ]
    if sizes or matched == 0:
        missing = [k for k in expected if k not in own]
        unexpected = [k for k in own if k not in expected]
        raise _mismatch_error(where, arch, matched, missing, unexpected, sizes, list(expected))
    result = skeleton.load_state_dict(own, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise _mismatch_error(
            where, arch, matched, list(result.missing_keys), list(result.unexpected_keys), [], list(expected)
        )
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
    return out, report, EntryResult(None, prefix, len(converted), kept)


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
    The default output is ``<stem>.ws<suffix>`` beside the input; the input is never modified and an
    existing output is replaced only with ``force``. The input's layout (wsconvert.checkpoint.layouts) says which
    state dicts to rewrite and what to write. Returns what was done; raises a WSConvertError subclass for every
    expected failure, leaving no output file behind.
    """
    say = progress or (lambda message: None)
    options = _jsonable(dict(options or {}))
    source = Path(input)
    target = Path(output) if output is not None else ckpt.default_output_path(source)
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
    release = (lambda: ckpt.release_mapped_pages(source)) if releases else None
    results: list[EntryResult] = []
    rewritten: dict[str | None, OrderedDict] = {}
    report: ConversionReport | None = None
    for key, state_dict in entries.models.items():
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
    notes = architecture.notes + notes + layout.notes(bake)

    conversion = CheckpointConversion(
        source, target, False, layout.label, layout.format, architecture.spec, architecture.kwargs, bake,
        report, results, entries.kept, entries.dropped, notes,
    )  # fmt: skip
    conversion.would_refuse = _check_output(target, force, dry_run)
    if dry_run:
        return conversion
    say(f"writing {target}")
    outputs = layout.assemble(loaded, rewritten, info, calibration_data=batches)
    _write(outputs, target, force=force, on_bytes=on_bytes, release=source if releases else None, source=identity)
    conversion.written = True
    return conversion


def _check_output(target: Path, force: bool, dry_run: bool) -> str | None:
    """Refuse an output the write would refuse (exists without ``force``, a directory, ...), once the input and
    the architecture have been validated: a wrong ``--arch`` is reported first, not hidden behind "pass --force".
    A dry run returns the refusal instead (it is reported, the exit code stays 0)."""
    try:
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
