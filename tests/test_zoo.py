"""The model-zoo sweep (scripts/zoo_sweep.py): every model as a slow test, plus fast tests of the checks.

Run the sweep with ``pytest -m slow tests/test_zoo.py``; the default suite runs only the fast tests below,
which show that each check of the sweep can fail.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_script
from torch import nn
from torchvision import models as tvm

zoo = load_script("zoo_sweep")

ENTRIES = zoo.all_entries()

# Third-party models that fail a check today, with the issue point whose fix makes them pass. strict=True: an
# entry that starts passing fails here, so remove it from this list when its fix lands.
XFAIL: dict[str, str] = {}


def _param(entry: zoo.Entry) -> object:
    marks = [pytest.mark.xfail(strict=True, reason=XFAIL[entry.id])] if entry.id in XFAIL else []
    return pytest.param(entry, id=entry.id, marks=marks)


# The sweep runs single-threaded (conftest.one_thread): its inputs are tiny, and on this project's shared
# 2-core machine it took 13.7 min with torch's default 2 threads against 6.0 min with one (both under load).


@pytest.mark.slow
@pytest.mark.parametrize("entry", [_param(e) for e in ENTRIES])
def test_zoo_model(entry: zoo.Entry, one_thread: object) -> None:
    result = zoo.run_entry(entry)
    assert result.ok, f"{entry.id}: " + "; ".join(result.problems)
    assert result.convs > 0
    assert result.unnormalized is not None, f"{entry.id}: no unnormalized-conv detection ({result.detection})"


# --- fast tests: the model list and the checks themselves ---------------------------------------------


def test_model_list_covers_the_issue() -> None:
    ids = {e.id for e in ENTRIES}
    assert len(ids) == len(ENTRIES), "duplicate model ids"
    for name in tvm.list_models(module=tvm):
        assert f"torchvision:{name}" in ids
    for module in (tvm.segmentation, tvm.detection, tvm.video):
        for name in tvm.list_models(module=module):
            assert f"torchvision:{name}" in ids
    assert "torchvision:fasterrcnn_resnet50_fpn[FrozenBatchNorm2d]" in ids
    timm_ids = [i for i in ids if i.startswith("timm:")]
    assert len(timm_ids) >= 40
    for family in ("resnetv2_50x1_bit", "nfnet_l0", "dm_nfnet_f0", "convnext_atto", "mobilevit_xxs"):
        assert f"timm:{family}" in ids


def test_frozen_batchnorm_entry_really_has_frozen_batchnorm() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    entry = next(e for e in ENTRIES if e.id == "torchvision:fasterrcnn_resnet50_fpn[FrozenBatchNorm2d]")
    with torch.device("meta"):
        model = entry.build()
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 53


def _toy(build: type[nn.Module] | object, id_: str = "toy") -> zoo.Entry:
    return zoo.Entry(id_, "test", build, lambda: (torch.randn(2, 3, 16, 16),))


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.bn(self.conv(x)))).mean((2, 3))


class OwnForwardBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward: wsconvert skips it, so a BatchNorm stays."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_clean_model_passes() -> None:
    result = zoo.run_entry(_toy(Small))
    assert result.ok, result.problems
    assert (result.convs, result.standardized, result.norms_replaced, result.unnormalized) == (2, 2, 1, 1)
    assert result.activations == 1


def test_leftover_batchnorm_is_a_failure() -> None:
    def build() -> nn.Module:
        model = Small()
        model.bn = OwnForwardBatchNorm(8)
        return model

    result = zoo.run_entry(_toy(build))
    assert not result.ok
    assert any("BatchNorm-family layer(s) left" in p for p in result.problems)


def test_dropped_activation_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """If conversion lost an activation (trap 1 of timm BatchNormAct2d), the call counts would differ."""
    real_convert = zoo.convert_model

    def lossy(model: nn.Module, **kwargs: object) -> nn.Module:
        converted = real_convert(model, **kwargs)
        converted.act = nn.Identity()
        return converted

    monkeypatch.setattr(zoo, "convert_model", lossy)
    result = zoo.run_entry(_toy(Small))
    assert result.problems == ["activation calls changed: 1 before, 0 after conversion"]


def test_double_standardization_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.nn.utils import parametrize

    from wsconvert import WeightStandardization

    real_convert = zoo.convert_model

    def twice(model: nn.Module, **kwargs: object) -> nn.Module:
        converted = real_convert(model, **kwargs)
        ws = WeightStandardization.for_conv(converted.conv, 1e-5, "standard")
        parametrize.register_parametrization(converted.conv, "weight", ws, unsafe=True)
        return converted

    monkeypatch.setattr(zoo, "convert_model", twice)
    problems = zoo.run_entry(_toy(Small)).problems
    assert "conv: 2 WeightStandardization parametrizations" in problems


def test_non_finite_output_and_exceptions_are_failures() -> None:
    class Exploding(Small):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) / 0.0 if self.training else super().forward(x)

    assert "non-finite output in training mode" in zoo.run_entry(_toy(Exploding)).problems

    def broken() -> nn.Module:
        raise RuntimeError("cannot build")

    assert zoo.run_entry(_toy(broken)).problems == ["RuntimeError: cannot build"]


def test_meta_mode_checks_structure() -> None:
    entry = _toy(Small)
    entry.meta = True
    result = zoo.run_entry(entry)
    assert result.ok and result.mode == "meta" and result.standardized == 2


def test_markdown_lists_failures_with_causes(monkeypatch: pytest.MonkeyPatch) -> None:
    good = zoo.run_entry(_toy(Small, "good"))
    bad = zoo.Result("bad", "test", problems=["RuntimeError: boom"])
    monkeypatch.setitem(zoo.KNOWN_CAUSES, "bad", "a known limitation")
    text = zoo.markdown([good, bad], seconds=60.0, threads=1)
    assert "**1 of 2 models pass**" in text
    assert "| good | test |" in text and "**FAIL**: RuntimeError: boom" in text
    assert "- **bad**: RuntimeError: boom. Cause: a known limitation" in text


def test_xfail_ids_are_sweep_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo, "library_installed", lambda module: True)  # every family, installed or not
    ids = {e.id for e in zoo.thirdparty_entries()}
    assert set(XFAIL) <= ids, sorted(set(XFAIL) - ids)


def test_thirdparty_families_follow_installed_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    labels = [label for _, _, label in zoo.THIRDPARTY]
    monkeypatch.setattr(zoo, "library_installed", lambda module: True)
    every = zoo.thirdparty_entries()
    for label in labels:
        family = [e for e in every if e.library == label]
        assert family, f"no entries for {label}"
        assert all(e.id.startswith(f"{label}:") for e in family)
    assert len({e.id for e in every}) == len(every)
    assert not any(e.library for e in zoo._timm_entries() + zoo._torchvision_video())

    monkeypatch.setattr(zoo, "library_installed", lambda module: module != "monai")
    assert not any(e.library == "monai" for e in zoo.thirdparty_entries())
    assert zoo.library_versions()["monai"] is None
    monkeypatch.setattr(zoo, "library_installed", lambda module: False)
    assert zoo.thirdparty_entries() == []
    assert set(zoo.library_versions().values()) == {None}


def test_installed_libraries_are_swept() -> None:
    ids = {e.id for e in ENTRIES}
    for module, _, label in zoo.THIRDPARTY:
        if zoo.library_installed(module):
            assert any(i.startswith(f"{label}:") for i in ids), label


def test_usage_check_failure_is_a_problem() -> None:
    def fuse(model: nn.Module, inputs: tuple) -> None:
        raise AttributeError("'GroupNorm' object has no attribute 'running_mean'")

    entry = _toy(Small)
    entry.usage, entry.usage_name = fuse, "lib fuse()"
    result = zoo.run_entry(entry)
    assert result.problems == ["lib fuse() raised AttributeError: 'GroupNorm' object has no attribute 'running_mean'"]

    seen: list[tuple] = []
    entry.usage = lambda model, inputs: seen.append((type(model).__name__, inputs[0].shape))
    assert zoo.run_entry(entry).ok
    assert seen == [("Small", torch.Size([2, 3, 16, 16]))]


def test_output_scale_measures_the_converted_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    scale = zoo.run_entry(_toy(Small)).output_scale
    assert scale is not None and 0 < scale < float("inf")
    real_convert = zoo.convert_model

    def louder(model: nn.Module, **kwargs: object) -> nn.Module:
        converted = real_convert(model, **kwargs)
        with torch.no_grad():
            converted.head.bias.add_(1e6)
        return converted

    monkeypatch.setattr(zoo, "convert_model", louder)
    assert zoo.run_entry(_toy(Small)).output_scale > 1e4 * scale


def test_markdown_has_a_thirdparty_section() -> None:
    core = zoo.run_entry(_toy(Small, "core"))
    lib = zoo.Result("lib:model", "lib: a family", library="lib", problems=["AttributeError: boom"])
    versions = {"lib": "1.2.3", "gone": None}
    text = zoo.markdown([core, lib], seconds=60.0, threads=1, versions=versions)
    head, _, third = text.partition("## Third-party libraries")
    assert "| core | test |" in head and "| lib:model |" not in head
    assert "| lib:model | lib: a family |" in third and "**FAIL**: AttributeError: boom" in third
    assert "third-party: lib 1.2.3 (not installed, not swept: gone)." in head
    assert "Libraries: lib 1.2.3 (not installed, not swept: gone)." in third
    assert "**0 of 1 third-party models pass.**" in third
    none = zoo.markdown([core], seconds=1.0, threads=1, versions={"lib": None})
    assert "No third-party library is installed." in none
