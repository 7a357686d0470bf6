"""Every recipe of docs/integrations.md runs (issue 4, point 8).

Single-process recipes run here; the DDP, FSDP2 and compile + DDP recipes run in the shared process group of
test_integration_distributed.py. ``torch.compile`` in recipes uses the aot_eager backend (see
``_dist_jobs.quick_compile``); inductor itself is tested in test_integration_compile.py.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import _dist_jobs as jobs  # noqa: E402

SINGLE = ("compile", "amp", "channels_last", "opacus", "export")

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::torch.jit.TracerWarning"
    ),
    pytest.mark.usefixtures("one_thread"),
]


def test_every_recipe_is_run_by_a_test() -> None:
    assert sorted(jobs.doc_recipes()) == sorted(SINGLE + jobs.DISTRIBUTED_RECIPES)


def test_every_recipe_converts_before_it_wraps() -> None:
    wrappers = ("DDP(", "fully_shard(", "torch.compile(", "make_private(", "wsconvert.bake(")
    for name, code in jobs.doc_recipes().items():
        convert = code.index("wsconvert.convert_model(")
        for wrapper in wrappers:
            if wrapper in code:
                assert code.index(wrapper) > convert or wrapper == "DDP(" and "DDP(wsconvert.convert_model" in code, (
                    f"recipe {name}: {wrapper} before convert_model"
                )


@pytest.mark.parametrize("name", SINGLE)
def test_single_process_recipe_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the export recipe writes a file
    torch._dynamo.reset()
    namespace = jobs.run_recipe(name)
    if name == "compile":
        assert isinstance(namespace["compiled"], torch._dynamo.eval_frame.OptimizedModule)
    if name in ("amp", "channels_last"):
        assert torch.isfinite(namespace["out"]).all()
    if name == "opacus":
        assert math.isfinite(namespace["epsilon"]) and namespace["epsilon"] > 0
    if name == "export":
        assert (tmp_path / "resnet18_ws_gn.onnx").stat().st_size > 1_000_000
    model = namespace["model"]
    assert isinstance(model, nn.Module)
    assert all(torch.isfinite(p).all() for p in model.parameters())
