"""Key maps (wsconvert.checkpoint.keys.match_keys): leading prefixes, inner prefixes inserted or removed by one
consistent rule, and the refusals: ambiguous renamings, partial matches and same-shape swap bait are never paired
by guess; the mismatch error says what the keys look like (another architecture, or the right one under a
renaming) with an example pair."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import wsconvert
from wsconvert.checkpoint import keys as key_maps
from wsconvert.checkpoint.rewrite import rewrite_state_dict
from wsconvert.errors import CheckpointError

W = [4, 4]  # every tensor has the same shape: only names can pair them
C = [4, 4, 3, 3]


def shapes(*keys: str, shape: list[int] = W) -> dict[str, list[int]]:
    return {key: list(shape) for key in keys}


# (checkpoint key -> shape, architecture key -> shape, expected pairs, expected rename rules)
MATCHED = {
    "leading prefix": (
        shapes("module.c.weight", "module.c.bias"),
        shapes("c.weight", "c.bias"),
        {"module.c.weight": "c.weight", "module.c.bias": "c.bias"},
        [],
    ),
    "inner prefix removed": (
        shapes("enc.conv_encoder.l1.weight", "enc.conv_encoder.l2.weight", "head.weight"),
        shapes("enc.l1.weight", "enc.l2.weight", "head.weight"),
        {
            "enc.conv_encoder.l1.weight": "enc.l1.weight",
            "enc.conv_encoder.l2.weight": "enc.l2.weight",
            "head.weight": "head.weight",
        },
        ["'conv_encoder.' removed after 'enc.' (2 keys"],
    ),
    "inner prefix inserted": (
        shapes("layers.0.fc1.weight", "layers.0.fc1.bias", "layers.0.norm.weight"),
        shapes("layers.0.mlp.fc1.weight", "layers.0.mlp.fc1.bias", "layers.0.norm.weight"),
        {
            "layers.0.fc1.weight": "layers.0.mlp.fc1.weight",
            "layers.0.fc1.bias": "layers.0.mlp.fc1.bias",
            "layers.0.norm.weight": "layers.0.norm.weight",
        },
        ["'mlp.' inserted after 'layers.0.' (2 keys"],
    ),
    "leading and inner prefix": (
        shapes("module.enc.conv_encoder.l1.weight", "module.head.weight"),
        shapes("enc.l1.weight", "head.weight"),
        {"module.enc.conv_encoder.l1.weight": "enc.l1.weight", "module.head.weight": "head.weight"},
        ["'conv_encoder.' removed after 'enc.' (1 keys"],
    ),
    "two-part inner prefix": (
        shapes("a.wrap.inner.b.weight", "a.wrap.inner.b.bias", "a.c.weight"),
        shapes("a.b.weight", "a.b.bias", "a.c.weight"),
        {"a.wrap.inner.b.weight": "a.b.weight", "a.wrap.inner.b.bias": "a.b.bias", "a.c.weight": "a.c.weight"},
        ["'wrap.inner.' removed after 'a.' (2 keys"],
    ),
    "same-shape swap bait: q and k keep their names": (
        shapes("q.weight", "k.weight"),
        shapes("attn.k.weight", "attn.q.weight"),
        {"q.weight": "attn.q.weight", "k.weight": "attn.k.weight"},
        ["'attn.' inserted at the start (2 keys"],
    ),
}


@pytest.mark.parametrize(("found", "expected", "pairs", "rules"), MATCHED.values(), ids=MATCHED.keys())
def test_matched_key_maps(found: dict, expected: dict, pairs: dict, rules: list[str]) -> None:
    keymap = key_maps.match_keys(found, expected)
    assert keymap.complete, keymap
    assert keymap.pairs == pairs
    assert len(keymap.renamed()) == len(rules)
    for line, rule in zip(sorted(keymap.renamed()), sorted(rules), strict=True):
        assert line.startswith(rule), line


# (checkpoint key -> shape, architecture key -> shape, pairs that may be made, field of KeyMap, text in it)
REFUSED = {
    "ambiguous: the run fits before or after a part": (
        shapes("layer.a.weight", "layer.b.weight"),
        shapes("layer.b.a.weight", "layer.a.b.weight"),
        {},
        "ambiguous",
        "layer.a.weight could be layer.a.b.weight or layer.b.a.weight",
    ),
    "ambiguous: two keys onto one": (
        shapes("m.p.a.weight", "m.q.a.weight"),
        shapes("m.a.weight"),
        {},
        "ambiguous",
        "m.p.a.weight and m.q.a.weight both map to m.a.weight",
    ),
    "swap bait: same shapes, unrelated names": (
        shapes("blk.conv1.weight", "blk.conv2.weight", shape=C),
        shapes("blk.0.weight", "blk.1.weight", shape=C),
        {},
        "unexpected",
        "blk.conv1.weight",
    ),
    "swap bait: renamed projections of one shape": (
        shapes("dec.sa_q.weight", "dec.ca_q.weight", "dec.norm.weight"),
        shapes("dec.self_attn.q.weight", "dec.encoder_attn.q.weight", "dec.norm.weight"),
        {"dec.norm.weight": "dec.norm.weight"},
        "unexpected",
        "dec.sa_q.weight",
    ),
    "partially matching: a renamed part": (
        shapes("attn.q_proj.weight", "attn.k_proj.weight", "attn.out_proj.weight"),
        shapes("attn.q_proj.weight", "attn.k_proj.weight", "attn.o_proj.weight"),
        {"attn.q_proj.weight": "attn.q_proj.weight", "attn.k_proj.weight": "attn.k_proj.weight"},
        "missing",
        "attn.o_proj.weight",
    ),
    "inner prefix with another shape": (
        {"enc.conv_encoder.l1.weight": [3, 4]},
        shapes("enc.l1.weight"),
        {"enc.conv_encoder.l1.weight": "enc.l1.weight"},
        "sizes",
        "enc.conv_encoder.l1.weight (as enc.l1.weight)",
    ),
    "a key already named never moves": (
        shapes("enc.l1.weight", "enc.x.l1.weight"),
        shapes("enc.l1.weight"),
        {"enc.l1.weight": "enc.l1.weight"},
        "unexpected",
        "enc.x.l1.weight",
    ),
}


@pytest.mark.parametrize(("found", "expected", "pairs", "field", "text"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_key_maps(found: dict, expected: dict, pairs: dict, field: str, text: str) -> None:
    keymap = key_maps.match_keys(found, expected)
    assert not keymap.complete
    assert keymap.pairs == pairs
    assert any(text in str(entry) for entry in getattr(keymap, field)), getattr(keymap, field)


def test_library_renaming_comes_before_inner_prefixes_and_never_moves_a_named_key() -> None:
    def rename(key: str) -> tuple[str, str | None]:
        return key.replace("out_proj", "o_proj"), None

    found = shapes("enc.conv_encoder.l1.weight", "attn.out_proj.weight", "attn.o_proj.bias")
    expected = shapes("enc.l1.weight", "attn.o_proj.weight", "attn.o_proj.bias")
    keymap = key_maps.match_keys(found, expected, ("a test loader", rename))
    assert keymap.complete
    assert keymap.pairs == {
        "enc.conv_encoder.l1.weight": "enc.l1.weight",
        "attn.out_proj.weight": "attn.o_proj.weight",
        "attn.o_proj.bias": "attn.o_proj.bias",
    }
    assert sorted(r.split(" (")[0] for r in keymap.renamed()) == [
        "'conv_encoder.' removed after 'enc.'",
        "renamed by a test loader",
    ]
    # two keys that the library renames onto one architecture key: refused, naming both
    clash = key_maps.match_keys(shapes("attn.out_proj.weight", "attn.o_proj.weight"), shapes("attn.o_proj.weight"))
    assert clash.unexpected == ["attn.out_proj.weight"]  # without the library: an unexpected key
    clash = key_maps.match_keys(
        shapes("attn.out_proj.weight", "attn.o_proj.weight"), shapes("attn.o_proj.weight"), ("a test loader", rename)
    )
    assert not clash.complete
    assert "attn.out_proj.weight (a test loader) and attn.o_proj.weight both map to attn.o_proj.weight" in str(
        clash.ambiguous
    )


def test_library_converters_are_reported_not_applied() -> None:
    def rename(key: str) -> tuple[str, str | None]:
        return (key, "in_proj_weight") if "in_proj" in key else (key, None)

    keymap = key_maps.match_keys(
        shapes("attn.in_proj_weight", "norm.weight"), shapes("attn.q.weight", "norm.weight"), ("a test loader", rename)
    )
    assert not keymap.complete and keymap.pairs == {"norm.weight": "norm.weight"}
    assert "tensor operations" in keymap.unsupported[0]


# --- through the rewrite: the converted output and the error text ------------------------------------------------


class Net(nn.Module):
    """A conv + BatchNorm backbone and an attention-like pair of projections of one shape."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleDict({"stem": nn.Conv2d(3, 8, 3, bias=False), "bn": nn.BatchNorm2d(8)})
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "o_proj": nn.Linear(8, 8)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone["bn"](self.backbone["stem"](x)).mean((2, 3))
        return self.attn["o_proj"](self.attn["q_proj"](y))


class Crossed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleDict(
            {"a": nn.ModuleDict({"b": nn.Linear(4, 4)}), "b": nn.ModuleDict({"a": nn.Linear(4, 4)})}
        )


def renamed(state_dict: dict, old: str, new: str) -> OrderedDict:
    return OrderedDict((k.replace(old, new), v) for k, v in state_dict.items())


def test_inner_prefix_converts_and_loads_strict_into_the_converted_model() -> None:
    original = Net().eval()
    with torch.no_grad():
        original.backbone["bn"].running_mean.uniform_(-0.1, 0.1)
        original.backbone["bn"].running_var.uniform_(0.5, 1.5)
    saved = renamed(original.state_dict(), "backbone.", "backbone.conv_encoder.")
    out, _, entry = rewrite_state_dict(saved, Net(), {"gn": 2})
    assert entry.renamed and entry.renamed[0].startswith("'conv_encoder.' removed after 'backbone.' (6 keys")
    model = wsconvert.convert_model(Net(), gn=2).eval()
    model.load_state_dict(out, strict=True)
    reference = wsconvert.convert_model(original, gn=2).eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), reference(x))


ERRORS = {
    "another architecture": (
        Net,
        lambda sd: OrderedDict((f"x{i}.tensor", v) for i, v in enumerate(sd.values())),
        ["none of its keys belong to", "look like another architecture; check --arch"],
    ),
    "the right one under a renaming": (
        Net,
        lambda sd: renamed(sd, "o_proj", "out_proj"),
        [
            "8 of 10 keys match, so the keys look like",
            "with a prefix or renaming wsconvert could not resolve, e.g. checkpoint 'attn.out_proj.weight' vs "
            "architecture 'attn.o_proj.weight'",
        ],
    ),
    "few keys match": (
        Net,
        lambda sd: OrderedDict(
            (k if k == "attn.q_proj.weight" else f"other{i}.t", v) for i, (k, v) in enumerate(sd.items())
        ),
        ["only 1 of 10 keys of", "match: the keys look like another architecture"],
    ),
    "another configuration": (
        Net,
        lambda sd: OrderedDict((k, torch.zeros(8, 4) if k == "attn.q_proj.weight" else v) for k, v in sd.items()),
        ["size mismatch for attn.q_proj.weight: [8, 4] in the checkpoint, [8, 8]",
         "the names are those of test:Net, 1 shapes are not: likely another configuration"],
    ),
    "a smaller configuration": (
        Net,
        lambda sd: OrderedDict((k, v) for k, v in sd.items() if not k.startswith("attn.o_proj")),
        ["missing keys attn.o_proj.weight, attn.o_proj.bias;",
         "every key of the checkpoint belongs to test:Net, which has 2 more: likely a smaller configuration"],
    ),
    "ambiguous": (
        Crossed,
        lambda sd: OrderedDict(
            [("layer.a.weight", sd["layer.a.b.weight"]), ("layer.a.bias", sd["layer.a.b.bias"]),
             ("layer.b.weight", sd["layer.b.a.weight"]), ("layer.b.bias", sd["layer.b.a.bias"])]
        ),
        ["ambiguous renaming: layer.a.weight could be layer.a.b.weight or layer.b.a.weight", "never guesses"],
    ),
}  # fmt: skip


@pytest.mark.parametrize(("build", "mutate", "texts"), ERRORS.values(), ids=ERRORS.keys())
def test_mismatch_hint_says_what_the_keys_look_like(build, mutate, texts: list[str]) -> None:  # noqa: ANN001
    state_dict = mutate(build().state_dict())
    with pytest.raises(CheckpointError) as error:
        rewrite_state_dict(state_dict, build(), {"gn": 2}, where="ckpt.pt", arch="test:Net")
    message = str(error.value)
    assert message.startswith("ckpt.pt does not match test:Net: ")
    for text in texts:
        assert text in message, message
