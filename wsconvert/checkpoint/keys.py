"""Which checkpoint key is which architecture key: the key map a rewrite loads through.

``match_prefix`` finds the leading prefix (``module.`` of DDP, ``_orig_mod.`` of torch.compile, a Lightning
attribute); ``match_keys`` builds the whole one-to-one map, in order: that prefix, keys equal to an architecture
key, the model library's own load-time renaming (transformers 5 renames keys in ``from_pretrained``,
``conversion_mapping.py``, and back in ``save_pretrained``), then inner prefixes inserted or removed. Tensors are
never paired by shape or name similarity: an ambiguous placement is reported (docs/cli.md, "Key prefixes and
renamed keys").
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .._optional import loaded_module, loaded_type

__all__ = ["INNER_RUN_PARTS", "KeyMap", "Rename", "closest_pair", "library_renaming", "match_keys", "match_prefix"]


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


# --- key maps: checkpoint keys -> architecture keys ----------------------------------------------------------------

# The longest run of dot-separated parts an inner prefix may have (``conv_encoder.``, ``mlp.``, ``0.module.``).
INNER_RUN_PARTS = 3
_EXAMPLES = 3


@dataclass
class Rename:
    """One rename rule and the key pairs it made: ``rule`` names it (e.g. ``'conv_encoder.' removed after
    'model.backbone.'``), ``source`` says where the rule comes from (a library's loader, or found in the keys)."""

    rule: str
    source: str
    pairs: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        old, new = self.pairs[0]
        return f"{self.rule} ({len(self.pairs)} keys, e.g. {_shortened(old)} -> {_shortened(new)})"


@dataclass
class KeyMap:
    """How a state dict's keys map onto an architecture's keys (``match_keys``).

    ``pairs``: checkpoint key (as in the file) -> architecture key, one-to-one; ``kept``: keys outside ``prefix``,
    kept as they are; ``unexpected``: keys under ``prefix`` (prefix stripped) that map to no architecture key;
    ``missing``: architecture keys that nothing maps to; ``sizes``: (key, shape in the file, shape in the
    architecture) of pairs whose shapes differ (the key as the file names it, ``as`` its architecture name when
    renamed); ``ambiguous``: keys a rename could pair in more than one way (never guessed); ``unsupported``:
    keys a library's loader converts with tensor operations (merged, split), which a rename cannot mirror.
    """

    prefix: str
    pairs: dict[str, str]
    kept: list[str]
    unexpected: list[str]
    missing: list[str]
    renames: list[Rename] = field(default_factory=list)
    sizes: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    direct: int = 0

    @property
    def complete(self) -> bool:
        """Every key under the prefix maps to an architecture key of the same shape and every architecture key
        is mapped, one-to-one."""
        return not (self.unexpected or self.missing or self.sizes or self.ambiguous or self.unsupported)

    def renamed(self) -> list[str]:
        """The rename rules applied, one line each (for the report)."""
        return [rename.describe() for rename in self.renames]


def _shortened(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 4 :]} ({len(text):,} characters)"


# One library loader's renaming: key -> (renamed key, the source pattern of a tensor-operation converter or None).
LibraryRenaming = Callable[[str], tuple[str, "str | None"]]


def library_renaming(model: nn.Module) -> tuple[str, LibraryRenaming] | None:
    """The key renaming the model's own library applies when it loads a checkpoint, as (name, rename), or None.

    transformers 5 renames checkpoint keys while loading (``from_pretrained``) and renames them back while saving
    (``save_pretrained``: ``core_model_loading.revert_weight_conversion``), so the files it writes hold keys the
    model does not have: DETR's ``model.backbone.conv_encoder.*`` for ``model.backbone.*``, ``out_proj`` for
    ``o_proj``, ``layers.N.fc1`` for ``layers.N.mlp.fc1`` (``conversion_mapping.py``). This mirrors its loader
    exactly: ``get_model_conversion_mapping(model)`` (the transforms ``from_pretrained`` uses), split into
    ``WeightRenaming`` and ``WeightConverter``, then ``rename_source_key(key, renamings, converters,
    model.base_model_prefix, model.state_dict())`` for every key. Converters (tensors merged or split) are
    reported, not applied. Only for models of an already imported transformers (wsconvert._optional).
    """
    pretrained = loaded_type("transformers.modeling_utils", "PreTrainedModel")
    if pretrained is None or not isinstance(model, pretrained):
        return None
    mapping = loaded_module("transformers.conversion_mapping")
    core = loaded_module("transformers.core_model_loading")
    get_mapping = getattr(mapping, "get_model_conversion_mapping", None)
    rename_key = getattr(core, "rename_source_key", None)
    renaming_type = getattr(core, "WeightRenaming", None)
    converter_type = getattr(core, "WeightConverter", None)
    if not all(callable(x) for x in (get_mapping, rename_key, renaming_type, converter_type)):
        return None  # transformers < 5: no conversion mapping
    try:
        transforms = list(get_mapping(model))  # type: ignore[misc]
    except Exception:  # noqa: BLE001 - a library's mapping code: without it the keys are matched as they are
        return None
    renamings = [t for t in transforms if isinstance(t, renaming_type)]  # type: ignore[arg-type]
    converters = [t for t in transforms if isinstance(t, converter_type)]  # type: ignore[arg-type]
    if not renamings and not converters:
        return None
    base = getattr(model, "base_model_prefix", None) or None
    meta = model.state_dict()

    def rename(key: str) -> tuple[str, str | None]:
        new, pattern = rename_key(key, renamings, converters, base, meta)  # type: ignore[misc]
        return str(new), None if pattern is None else str(pattern)

    return f"transformers' load-time conversion mapping of {type(model).__name__}", rename


def _parts_removed(parts: tuple[str, ...]) -> Iterator[tuple[int, int, tuple[str, ...]]]:
    """(start, length, remaining parts) for every run of 1..INNER_RUN_PARTS consecutive parts that can be removed
    from ``parts``, the last part (the tensor's own name) always staying."""
    for start in range(len(parts) - 1):
        for length in range(1, min(INNER_RUN_PARTS, len(parts) - 1 - start) + 1):
            yield start, length, parts[:start] + parts[start + length :]


@dataclass(frozen=True)
class _Rule:
    """Keys under ``old`` (a run of parts) are renamed to ``new`` + the rest: ``run`` was inserted (``insert``)
    into, or removed from, the checkpoint's keys after ``head``, before the part ``next``."""

    insert: bool
    head: tuple[str, ...]
    run: tuple[str, ...]
    next: str

    @property
    def old(self) -> tuple[str, ...]:
        return self.head + ((self.next,) if self.insert else self.run + (self.next,))

    @property
    def new(self) -> tuple[str, ...]:
        return self.head + (self.run + (self.next,) if self.insert else (self.next,))

    def apply(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        return self.new + parts[len(self.old) :]

    def describe(self) -> str:
        run, head = ".".join(self.run) + ".", ".".join(self.head)
        where = f"after {head + '.'!r}" if head else "at the start"
        return f"{run!r} {'inserted' if self.insert else 'removed'} {where}"


def _inner_renames(
    unmatched: list[str], free: set[str], max_parts: int
) -> tuple[dict[str, tuple[str, _Rule]], list[str]]:
    """Pairs (checkpoint key -> (architecture key, rule)) explained by an inner prefix inserted or removed, and the
    ambiguities (messages).

    A candidate rule comes from one key pair that differs by a run of 1..INNER_RUN_PARTS parts at one place
    (``a.conv_encoder.b.w`` / ``a.b.w``). It covers every unmatched key under its old head (the parts up to and
    including the one after the run) and is accepted only when it maps every one of them to a free architecture
    key: one consistent rule, never a similarity guess. A key that accepted rules map to two different keys, and
    an architecture key two checkpoint keys map to, are ambiguous and left unmatched.
    """
    keys = {key: tuple(key.split(".")) for key in unmatched if key.count(".") < max_parts + INNER_RUN_PARTS}
    by_parts = {parts: key for key, parts in keys.items()}
    free_parts = {tuple(key.split(".")): key for key in free if key.count(".") < max_parts}
    rules: set[_Rule] = set()
    for parts in keys.values():  # runs the checkpoint has and the architecture lacks
        for start, length, rest in _parts_removed(parts):
            if rest in free_parts:
                rules.add(_Rule(False, parts[:start], parts[start : start + length], parts[start + length]))
    for parts in free_parts:  # runs the architecture has and the checkpoint lacks
        for start, length, rest in _parts_removed(parts):
            if rest in by_parts:
                rules.add(_Rule(True, parts[:start], parts[start : start + length], parts[start + length]))
    under: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for parts in keys.values():
        for end in range(1, len(parts) + 1):  # a head may be the whole key (a run inserted before its last part)
            under.setdefault(parts[:end], []).append(parts)
    targets: dict[str, dict[str, _Rule]] = {}
    for rule in sorted(rules, key=lambda r: (r.old, r.new)):
        domain = under.get(rule.old, [])
        mapped = [(parts, rule.apply(parts)) for parts in domain]
        if mapped and all(new in free_parts for _, new in mapped):
            for parts, new in mapped:
                targets.setdefault(by_parts[parts], {}).setdefault(free_parts[new], rule)
    ambiguous: list[str] = []
    pairs: dict[str, tuple[str, _Rule]] = {}
    for key, found in targets.items():
        if len(found) > 1:
            ambiguous.append(f"{_shortened(key)} could be {' or '.join(_shortened(k) for k in sorted(found))}")
        else:
            ((target, rule),) = found.items()
            pairs[key] = (target, rule)
    claimed: dict[str, list[str]] = {}
    for key, (target, _) in pairs.items():
        claimed.setdefault(target, []).append(key)
    for target, sources in claimed.items():
        if len(sources) > 1:
            ambiguous.append(f"{' and '.join(_shortened(k) for k in sorted(sources))} both map to {_shortened(target)}")
            for key in sources:
                del pairs[key]
    return pairs, ambiguous


def match_keys(
    shapes: Mapping[str, Any],
    expected: Mapping[str, Any],
    renaming: tuple[str, LibraryRenaming] | None = None,
) -> KeyMap:
    """Map a state dict's keys (``shapes``: key -> shape) onto an architecture's (``expected``: key -> shape).

    In this order, each step only for the keys the previous ones left: (1) the leading prefix (``module.``,
    ``_orig_mod.``, a Lightning attribute: ``match_prefix``), stripped; (2) keys equal to an architecture key;
    (3) the model library's own load-time renaming (``renaming``, e.g. ``library_renaming(model)``: transformers'
    conversion mapping); (4) inner prefixes inserted or removed by one consistent rule (``_inner_renames``). The
    result is one-to-one: a key never moves when it already names an architecture key, two keys never map to one
    key, and a key two rules pair differently is reported as ambiguous instead of guessed. Pairs whose shapes
    differ are reported in ``sizes`` (never loaded). Shapes may be None (unknown: only names are compared).
    """
    keys = list(shapes)
    names = set(expected)
    prefix, direct = match_prefix(keys, names)
    if renaming is not None:
        renamed_prefix, votes = match_prefix([renaming[1](k)[0] for k in keys], names)
        if votes > direct:
            prefix = renamed_prefix
    own = [k for k in keys if k.startswith(prefix)]
    kept = [k for k in keys if not k.startswith(prefix)]
    pairs: dict[str, str] = {}
    claimed: dict[str, str] = {}
    for key in own:
        stripped = key[len(prefix) :]
        if stripped in names:
            pairs[key] = claimed[stripped] = stripped
    direct = len(pairs)
    renames: dict[tuple[str, str], Rename] = {}
    ambiguous: list[str] = []
    unsupported: list[str] = []
    converted: set[str] = set()

    def pair(key: str, target: str, rule: str, source: str) -> None:
        if target in claimed:
            ambiguous.append(
                f"{_shortened(key)} ({source}) and {_shortened(claimed[target])} both map to {_shortened(target)}"
            )
            return
        pairs[key] = claimed[target] = target
        renames.setdefault((source, rule), Rename(rule, source)).pairs.append((key[len(prefix) :], target))

    if renaming is not None:
        source, rename = renaming
        for key in own:
            if key in pairs:
                continue
            target, converter = rename(key[len(prefix) :])
            if converter is not None:
                converted.add(key)
                unsupported.append(f"{_shortened(key)} ({source} converts it with tensor operations: {converter!r})")
            elif target in names:
                pair(key, target, f"renamed by {source}", source)
    left = [k for k in own if k not in pairs and k not in converted]
    if left:
        max_parts = max((k.count(".") + 1 for k in names), default=0)
        found, unresolved = _inner_renames([k[len(prefix) :] for k in left], names - set(claimed), max_parts)
        ambiguous += unresolved
        for stripped, (target, rule) in found.items():
            pair(prefix + stripped, target, rule.describe(), "inner prefix")
    sizes = []
    for key, target in pairs.items():
        got, want = shapes[key], expected[target]
        if got is not None and want is not None and list(got) != list(want):
            name = key[len(prefix) :]
            sizes.append((name if name == target else f"{name} (as {target})", list(got), list(want)))
    return KeyMap(
        prefix=prefix,
        pairs=pairs,
        kept=kept,
        unexpected=[k[len(prefix) :] for k in own if k not in pairs],
        missing=[k for k in expected if k not in claimed],
        renames=list(renames.values()),
        sizes=sizes,
        ambiguous=ambiguous,
        unsupported=unsupported,
        direct=direct,
    )


def closest_pair(keymap: KeyMap, shapes: Mapping[str, Any], expected: Mapping[str, Any]) -> tuple[str, str] | None:
    """For a message only, never for matching: the unexpected checkpoint key and missing architecture key that look
    most alike (same shape when both are known; difflib's ratio on the names), or None."""
    best: tuple[float, str, str] | None = None
    for key in keymap.unexpected[:32]:
        got = shapes.get(keymap.prefix + key)
        for target in keymap.missing[:32]:
            want = expected.get(target)
            known = [list(shape) for shape in (got, want) if shape is not None]
            if [] in known or len(known) == 2 and known[0] != known[1]:
                continue  # a scalar (num_batches_tracked) or another shape: not an example worth naming
            score = difflib.SequenceMatcher(None, key, target, autojunk=False).ratio()
            if best is None or score > best[0]:
                best = (score, key, target)
    return None if best is None else (best[1], best[2])
