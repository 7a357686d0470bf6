"""transformers 5 DETR files (issue 13, point 8): ``save_pretrained`` writes keys the model does not have (its loader's
conversion mapping reversed: ``model.backbone.conv_encoder.*``, ``out_proj``, ``layers.N.fc1``; ConditionalDetr
also ``sa_qcontent_proj``...). wsconvert mirrors the loader's renaming, so the saved model.safetensors converts
through the CLI, and its output loads strict into ``convert_model(arch(), same options)`` and computes the same."""

from __future__ import annotations

import copy
from pathlib import Path

from _thirdparty import needs

transformers = needs("transformers")

import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner, Result  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import wsconvert  # noqa: E402
from wsconvert.checkpoint import keys as key_maps  # noqa: E402
from wsconvert.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

GN = 4
TINY = {
    "use_timm_backbone": False,
    "use_pretrained_backbone": False,
    "backbone_config": {
        "model_type": "resnet",
        "embedding_size": 8,
        "hidden_sizes": [8, 16, 16, 16],
        "depths": [1, 1, 1, 1],
        "layer_type": "basic",
        "out_features": ["stage4"],
    },
    "d_model": 16,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 16,
    "decoder_ffn_dim": 16,
    "num_queries": 4,
    "num_labels": 3,
}


def tiny_detr(**kwargs: object) -> torch.nn.Module:
    """A small random DetrForObjectDetection (the spec ``test_key_maps_detr:tiny_detr``)."""
    return transformers.DetrForObjectDetection(transformers.DetrConfig(**{**TINY, **kwargs}))


def tiny_conditional_detr(**kwargs: object) -> torch.nn.Module:
    """A small random ConditionalDetrForObjectDetection."""
    return transformers.ConditionalDetrForObjectDetection(transformers.ConditionalDetrConfig(**{**TINY, **kwargs}))


FACTORIES = {"detr": tiny_detr, "conditional_detr": tiny_conditional_detr}


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="wsconvert")


def saved(tmp_path: Path, name: str) -> tuple[torch.nn.Module, Path]:
    """The model with random running statistics, saved by ``save_pretrained``: its model.safetensors."""
    model = FACTORIES[name]().eval()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("running_mean"):
                tensor.uniform_(-0.1, 0.1)
            elif key.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "saved")
    return model, tmp_path / "saved" / "model.safetensors"


def outputs(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        result = model(pixel_values=pixels)
    return result.logits, result.pred_boxes


@pytest.mark.parametrize("name", FACTORIES)
def test_save_pretrained_file_converts_and_loads_strict(tmp_path: Path, name: str) -> None:
    model, path = saved(tmp_path, name)
    with safe_open(path, "pt") as file:
        file_keys = set(file.keys())
    model_keys = set(model.state_dict())
    # what transformers 5 writes: keys the model does not have (guards this test against becoming vacuous)
    assert any(".backbone.conv_encoder." in k for k in file_keys) and not file_keys & {
        k for k in model_keys if ".backbone." in k
    }
    assert len(file_keys) == len(model_keys) and file_keys != model_keys

    out = tmp_path / "out.safetensors"
    result = run(path, "--arch", f"{__name__}:{FACTORIES[name].__name__}", "--gn", GN, "-o", out)
    assert result.exit_code == 0, (result.output, result.exception)
    mapping = f"transformers' load-time conversion mapping of {type(model).__name__}"
    rule = f"keys renamed to the architecture's: renamed by {mapping}"
    assert rule in result.output, result.output
    converted = wsconvert.convert_model(FACTORIES[name](), gn=GN).eval()
    converted.load_state_dict(load_file(out), strict=True)
    reference = wsconvert.convert_model(copy.deepcopy(model), gn=GN).eval()
    pixels = torch.randn(1, 3, 64, 64)
    for got, want in zip(outputs(converted, pixels), outputs(reference, pixels), strict=True):
        torch.testing.assert_close(got, want)
    loaded = wsconvert.load(out).eval()  # the recorded spec and options rebuild the same model
    for got, want in zip(outputs(loaded, pixels), outputs(reference, pixels), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("name", "example"),
    [
        ("detr", "'model.decoder.layers.0.encoder_attn.out_proj.weight' vs architecture "
         "'model.decoder.layers.0.encoder_attn.o_proj.weight'"),
        ("conditional_detr", "vs architecture 'model.decoder.layers.0."),
    ],
)  # fmt: skip
def test_without_the_library_mapping_the_hint_names_the_renaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, example: str
) -> None:
    """Inner prefixes alone (conv_encoder., mlp.) do not explain out_proj -> o_proj or sa_qcontent_proj ->
    self_attn.q_content_proj (tensors of one shape): nothing is paired by guess, and the error says the keys look
    like the architecture under a renaming, with an example pair."""
    _, path = saved(tmp_path, name)
    monkeypatch.setattr(key_maps, "library_renaming", lambda model: None)
    out = tmp_path / "out.safetensors"
    result = run(path, "--arch", f"{__name__}:{FACTORIES[name].__name__}", "--gn", GN, "-o", out)
    assert result.exit_code == 1 and not out.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "keys match, so the keys look like" in lines[0], lines[0]
    assert "with a prefix or renaming wsconvert could not resolve, e.g. checkpoint" in lines[0], lines[0]
    assert example in lines[0], lines[0]
