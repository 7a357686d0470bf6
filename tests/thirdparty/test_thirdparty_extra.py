"""The thirdparty extra itself: every library it declares imports (under CI a missing one fails)."""

from __future__ import annotations

import pytest
from _thirdparty import needs

LIBRARIES = [
    ("transformers", "transformers"),
    ("segmentation_models_pytorch", "segmentation-models-pytorch"),
    ("ultralytics", "ultralytics"),
    ("monai", "monai"),
    ("effdet", "effdet"),
    ("pytorchvideo", "pytorchvideo"),
    ("open_clip", "open-clip-torch"),
]


@pytest.mark.parametrize(("module", "distribution"), LIBRARIES)
def test_library_imports(module: str, distribution: str) -> None:
    lib = needs(module)
    assert lib.__name__ == module


def test_extra_declares_every_library() -> None:
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["thirdparty"]
    declared = {entry.split(">")[0].split("=")[0].split("<")[0] for entry in extra}
    assert declared == {distribution for _, distribution in LIBRARIES}
