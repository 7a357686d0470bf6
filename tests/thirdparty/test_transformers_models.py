"""Real transformers models, tiny random configs, nothing downloaded (issue 13, points 1, 2 and 3).

1. BiT's ``WeightStandardizedConv2d`` (models/bit/modeling_bit.py; the backbone of DPT-hybrid) standardizes its own
   weight: it is never standardized twice, ``is_standardized`` says so, the report lists it as already standardized.
2. The DETR family's private ``*FrozenBatchNorm2d`` classes (14 in transformers 5.25, one source copied 14 times)
   become GroupNorms, and the unnormalized-conv probe counts them as norm layers (no false alarm on the backbone).
3. No HF model traces with torch.fx: the probe runs on a synthetic input built from the model's config; where that
   input cannot run the model, plan_conversion warns (ProbeUnavailableWarning) and the CLI prints a ``Warning:``.
   On DPT-hybrid, ``skip_unnormalized=True`` keeps the output's scale where the default conversion explodes.
"""

from __future__ import annotations

import copy
import inspect
import warnings

from _thirdparty import needs

transformers = needs("transformers")

import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import wsconvert  # noqa: E402
from wsconvert import rules  # noqa: E402
from wsconvert.cli import main  # noqa: E402
from wsconvert.errors import ProbeUnavailableWarning  # noqa: E402
from wsconvert.testing import check_conversion  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
T = transformers
GN = 32
X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
ALREADY = "already weight-standardized (WeightStandardizedConv2d)"


# --- tiny configs ---------------------------------------------------------------------------------------------


def _bit_config(**kwargs: object) -> object:
    return T.BitConfig(embedding_size=8, num_groups=4, **kwargs)


def bit_classifier() -> nn.Module:
    return T.BitForImageClassification(_bit_config(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_labels=3))


def bit_backbone() -> nn.Module:
    config = _bit_config(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], out_features=["stage2", "stage4"])
    return T.BitBackbone(config)


def dpt_hybrid() -> nn.Module:
    """DPT-hybrid (is_hybrid=True): a BiT backbone (global_padding SAME, as the released dpt-hybrid-midas), a ViT."""
    backbone = _bit_config(
        hidden_sizes=[16, 16, 16],
        depths=[1, 1, 1],
        layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3"],
        global_padding="same",
        embedding_dynamic_padding=True,
    )
    config = T.DPTConfig(
        is_hybrid=True,
        backbone_config=backbone,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        backbone_out_indices=[0, 1, 0, 1],
        image_size=64,
        patch_size=16,
        backbone_featmap_shape=[1, 16, 4, 4],
        neck_hidden_sizes=[16, 16, 16, 16],
        fusion_hidden_size=8,
        head_hidden_size=8,
        readout_type="project",
    )
    return T.DPTForDepthEstimation(config)


def _resnet(out_features: list[str]) -> object:
    return T.ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=out_features,
    )


def _hgnet() -> object:
    return T.HGNetV2Config(
        embedding_size=8,
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 16, 16],
        stage_mid_channels=[8, 8, 8, 8],
        stage_out_channels=[16, 16, 16, 16],
        stage_num_blocks=[1, 1, 1, 1],
        stage_numb_of_layers=[1, 1, 1, 1],
        stage_kernel_size=[3, 3, 3, 3],
        stage_downsample=[False, True, True, True],
        stage_light_block=[False] * 4,
        hidden_sizes=[16, 16, 16, 16],
        depths=[1, 1, 1, 1],
        out_features=["stage2", "stage3", "stage4"],
    )


def _rt_resnet() -> object:
    return T.RTDetrResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )


HEADS = {"encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 16, "decoder_ffn_dim": 16}
DETR = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "num_queries": 5, "num_labels": 3, **HEADS}
RT = {
    **HEADS,
    "d_model": 16,
    "encoder_hidden_dim": 16,
    "encoder_in_channels": [16, 16, 16],
    "encoder_layers": 1,
    "decoder_layers": 2,
    "num_queries": 5,
    "num_labels": 3,
    "feat_strides": [8, 16, 32],
    "num_feature_levels": 3,
    "decoder_in_channels": [16, 16, 16],
}
RT_RESNET = {**RT, "encoder_in_channels": [16, 24, 32]}
DEFORMABLE = {**DETR, "d_model": 32, "decoder_layers": 2, "num_feature_levels": 3}
TEXT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}


def grounding_dino() -> nn.Module:
    """A ResNet backbone (so it holds frozen BatchNorms) and a tiny BERT; its forward needs ``input_ids``."""
    config = T.GroundingDinoConfig(
        backbone_config=_resnet(["stage2", "stage3", "stage4"]),
        text_config=T.BertConfig(vocab_size=50, **TEXT),
        **{**DEFORMABLE, "encoder_n_points": 2, "decoder_n_points": 2},
    )
    config.num_labels = 3
    return T.GroundingDinoForObjectDetection(config)


def _build(model_class: str, config_class: str, **config: object):  # noqa: ANN202
    return lambda: getattr(T, model_class)(getattr(T, config_class)(**config))


DETR_FAMILY = {
    # id: (builder, forward inputs beyond pixel_values)
    "detr": _build(
        "DetrForObjectDetection", "DetrConfig", use_timm_backbone=False, backbone_config=_resnet(["stage4"]), **DETR
    ),
    "conditional_detr": _build(
        "ConditionalDetrForObjectDetection",
        "ConditionalDetrConfig",
        use_timm_backbone=False,
        backbone_config=_resnet(["stage4"]),
        **DETR,
    ),
    "table_transformer": _build(
        "TableTransformerForObjectDetection",
        "TableTransformerConfig",
        use_timm_backbone=False,
        backbone_config=_resnet(["stage4"]),
        **DETR,
    ),
    "dab_detr": _build(
        "DabDetrForObjectDetection",
        "DabDetrConfig",
        use_timm_backbone=False,
        backbone_config=_resnet(["stage4"]),
        hidden_size=16,
        **{k: v for k, v in DETR.items() if k != "d_model"},
    ),
    "deformable_detr": _build(
        "DeformableDetrForObjectDetection",
        "DeformableDetrConfig",
        use_timm_backbone=False,
        backbone_config=_resnet(["stage2", "stage3", "stage4"]),
        encoder_n_points=2,
        decoder_n_points=2,
        **DEFORMABLE,
    ),
    "rt_detr": _build("RTDetrForObjectDetection", "RTDetrConfig", backbone_config=_rt_resnet(), **RT_RESNET),
    "rt_detr_v2": _build(
        "RTDetrV2ForObjectDetection", "RTDetrV2Config", backbone_config=_rt_resnet(), decoder_n_points=2, **RT_RESNET
    ),
    "d_fine": _build("DFineForObjectDetection", "DFineConfig", backbone_config=_hgnet(), decoder_n_points=2, **RT),
    "deimv2": _build("Deimv2ForObjectDetection", "Deimv2Config", backbone_config=_hgnet(), decoder_n_points=2, **RT),
    "grounding_dino": grounding_dino,
}
INPUT_IDS = torch.tensor([[1, 5, 7, 2]])


def _inputs(name: str) -> tuple:
    return (X, INPUT_IDS) if name == "grounding_dino" else (X,)


def _frozen_classes() -> dict[str, type]:
    """Every ``*FrozenBatchNorm2d`` class transformers defines in its modeling files (imported here)."""
    import importlib
    import pkgutil

    found = {}
    for info in pkgutil.iter_modules(T.models.__path__):
        source = importlib.util.find_spec(f"transformers.models.{info.name}")
        if source is None or not source.submodule_search_locations:
            continue
        path = f"{source.submodule_search_locations[0]}/modeling_{info.name}.py"
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except OSError:
            continue
        if "FrozenBatchNorm2d(nn.Module)" not in text:
            continue
        module = importlib.import_module(f"transformers.models.{info.name}.modeling_{info.name}")
        for name, value in vars(module).items():
            if name.endswith("FrozenBatchNorm2d") and isinstance(value, type) and value.__module__ == module.__name__:
                found[name] = value
    return found


def _paths_of(model: nn.Module, predicate) -> list[str]:  # noqa: ANN001
    return [path for path, module in model.named_modules() if predicate(module)]


def _is_bit_conv(module: nn.Module) -> bool:
    return type(module).__name__ == "WeightStandardizedConv2d"


def _is_frozen(module: nn.Module) -> bool:
    return type(module).__name__.endswith("FrozenBatchNorm2d")


# --- point 1: BiT WeightStandardizedConv2d, never standardized twice -------------------------------------------

BIT_MODELS = {"bit_classifier": bit_classifier, "bit_backbone": bit_backbone, "dpt_hybrid": dpt_hybrid}


@pytest.mark.parametrize("name", list(BIT_MODELS))
def test_bit_convs_are_recognized_as_already_standardized(name: str) -> None:
    torch.manual_seed(0)
    model = BIT_MODELS[name]().eval()
    bit_convs = _paths_of(model, _is_bit_conv)
    assert bit_convs  # the model does hold them
    assert all(rules.is_standardized(model.get_submodule(p)) for p in bit_convs)
    report = wsconvert.plan_conversion(model, gn=GN)
    skipped = {s.path: s.reason for s in report.skipped}
    assert {p: skipped.get(p) for p in bit_convs} == dict.fromkeys(bit_convs, ALREADY)
    assert not {c.path for c in report.converted} & set(bit_convs)
    converted = wsconvert.convert_model(model, gn=GN)
    assert not any(parametrize.is_parametrized(converted.get_submodule(p)) for p in bit_convs)
    check_conversion(model, converted, X, report=report)  # raises on any violated invariant (standardized twice...)
    fresh = wsconvert.convert_model(BIT_MODELS[name]().eval(), gn=GN)
    assert not fresh.load_state_dict(model.state_dict(), strict=True).missing_keys  # original state dicts load
    with torch.no_grad():
        torch.testing.assert_close(_first_output(fresh(X)), _first_output(converted(X)))


def _first_output(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "predicted_depth", "feature_maps"):
        value = getattr(output, key, None)
        if value is not None:
            return value if isinstance(value, torch.Tensor) else value[-1]
    raise AssertionError(f"no tensor output in {type(output).__name__}")


# --- point 2: DETR-family frozen BatchNorms ----------------------------------------------------------------------


def test_every_frozen_batchnorm_class_is_covered_by_a_built_model() -> None:
    classes = _frozen_classes()
    assert len(classes) >= 14, sorted(classes)  # transformers 5.25: 14
    held = set()
    for build in DETR_FAMILY.values():
        held |= {type(m).__name__ for m in build().modules() if _is_frozen(m)}
    for name, cls in classes.items():
        assert rules.is_norm(cls(4)), name  # each one matches the DETR-style rule, built or not
    # built here: all but the ones whose model repeats another's code (listed so that a new class shows up)
    # (PP-DocLayout needs a mask-feature config beyond a few minutes' work: its classes are checked above only)
    not_built = {
        "MMGroundingDinoFrozenBatchNorm2d",
        "PPDocLayoutV2FrozenBatchNorm2d",
        "PPDocLayoutV3FrozenBatchNorm2d",
        "PPDocLayoutV4FrozenBatchNorm2d",
    }
    assert set(classes) - held == not_built, sorted(set(classes) - held)


@pytest.mark.parametrize("name", list(DETR_FAMILY))
def test_detr_family_frozen_batchnorms_become_group_norms_and_count_as_norms(name: str) -> None:
    torch.manual_seed(0)
    model = DETR_FAMILY[name]().eval()
    inputs = _inputs(name)
    frozen = {p: model.get_submodule(p) for p in _paths_of(model, _is_frozen)}
    assert frozen, name
    report = wsconvert.plan_conversion(model, gn=GN, example_inputs=inputs)
    converted_rows = {c.path: c.new_type for c in report.converted}
    skipped = {s.path: s.reason for s in report.skipped}
    for path in frozen:  # converted, or skipped with a reason: never silently left
        assert converted_rows.get(path, "").startswith("GroupNorm(") or skipped.get(path), path
    assert not any(p in skipped for p in frozen)  # with gn set, every one is converted
    # the probe counts them as norm layers: no conv feeding one is reported (the "54 convs" false alarm)
    feeding = {p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)} - {u.path for u in report.unnormalized}
    assert feeding, report.unnormalized
    backbone = [u.path for u in report.unnormalized if ".backbone." in f".{u.path}" and "conv" in u.type.lower()]
    assert all(not _feeds_frozen(model, p) for p in backbone), backbone
    converted = wsconvert.convert_model(model, gn=GN)
    assert not _paths_of(converted, _is_frozen)
    for path, old in frozen.items():
        new = converted.get_submodule(path)
        assert isinstance(new, nn.GroupNorm) and new.eps == 1e-5
        torch.testing.assert_close(new.weight, old.weight, rtol=0, atol=0)
        torch.testing.assert_close(new.bias, old.bias, rtol=0, atol=0)
    # GroundingDino masks padded text tokens with -inf in its logits, in the original model too
    check_conversion(model, converted, inputs, report=report, backward=False, check_finite=name != "grounding_dino")
    fresh = wsconvert.convert_model(DETR_FAMILY[name](), gn=GN)
    fresh.load_state_dict(model.state_dict(), strict=True)  # the original's keys (running stats dropped) load
    # without an input the probe runs on a synthetic one and finds the same convs
    if name != "grounding_dino":
        synthetic = wsconvert.plan_conversion(model, gn=GN)
        assert synthetic.unnormalized_detection.startswith("forward hooks on a synthetic input")
        assert {u.path for u in synthetic.unnormalized} == {u.path for u in report.unnormalized}


def _feeds_frozen(model: nn.Module, conv_path: str) -> bool:
    """Whether the conv at ``conv_path`` is directly followed by a frozen BatchNorm sibling in its parent."""
    parent_path, _, name = conv_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    names = list(parent._modules)
    index = names.index(name)
    return index + 1 < len(names) and _is_frozen(parent._modules[names[index + 1]])


# --- point 3: untraceable HF models: a synthetic input, or a loud warning ------------------------------------------


def test_dpt_hybrid_probe_finds_neck_and_head_convs_and_skip_keeps_the_output_scale() -> None:
    torch.manual_seed(0)
    model = dpt_hybrid().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeUnavailableWarning)
        report = wsconvert.plan_conversion(model, gn=GN)
    assert report.unnormalized_detection.startswith(
        "forward hooks on a synthetic input of shape (1, 3, 64, 64) (channels from config.num_channels, size from "
        "config.image_size)"
    )
    found = [u.path for u in report.unnormalized]
    assert len(found) == 29 and all(p.startswith(("neck.", "head.", "dpt.embeddings.projection")) for p in found)
    assert "probe_synthetic" in [h.kind for h in report.hints]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x).predicted_depth.abs().mean()
        default = wsconvert.convert_model(model, gn=GN)(x).predicted_depth
        skipping = wsconvert.convert_model(model, gn=GN, skip_unnormalized=True)(x).predicted_depth
    assert torch.isfinite(skipping).all()
    assert default.abs().mean() / reference > 1e3  # the default conversion explodes (measured 1.2e-5 -> 7e9)
    assert 0.1 < skipping.abs().mean() / reference < 10  # skip_unnormalized keeps the scale


def test_model_the_synthetic_input_cannot_run_warns_with_the_fix() -> None:
    model = grounding_dino().eval()  # its forward needs input_ids
    with pytest.warns(ProbeUnavailableWarning) as caught:
        report = wsconvert.plan_conversion(model, gn=GN)
    (message,) = [str(w.message) for w in caught]
    assert "synthetic input of shape (1, 3, 224, 224)" in message and "'input_ids'" in message
    assert "pass example_inputs or input_shape" in message and "--input-shape" in message
    assert report.unnormalized_detection.startswith("unavailable: ")
    assert [h.message for h in report.hints if h.warning] == [message]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeUnavailableWarning)
        with_input = wsconvert.plan_conversion(model, gn=GN, example_inputs=_inputs("grounding_dino"))
    assert with_input.unnormalized_detection.startswith("forward hooks on the example input")


def tiny_grounding_dino() -> nn.Module:
    """For ``--arch test_transformers_models:tiny_grounding_dino``."""
    torch.manual_seed(0)
    return grounding_dino()


def test_cli_prints_a_warning_line_when_the_probe_cannot_run(tmp_path) -> None:  # noqa: ANN001
    source = tmp_path / "gdino.pt"
    torch.save(tiny_grounding_dino().state_dict(), source)
    args = [str(source), "--arch", f"{__name__}:tiny_grounding_dino", "--gn", str(GN), "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(lines) == 1, result.stderr
    assert "could not be looked for" in lines[0] and "--input-shape" in lines[0]
    assert "ProbeUnavailableWarning" not in result.stderr


def test_forward_signatures_used_here_take_pixel_values_first() -> None:
    """The synthetic input is the one positional argument: HF vision models take ``pixel_values`` first."""
    for build in [*BIT_MODELS.values(), *DETR_FAMILY.values()]:
        assert next(iter(inspect.signature(build().forward).parameters)) == "pixel_values"


def test_converting_leaves_the_original_unchanged() -> None:
    model = DETR_FAMILY["detr"]().eval()
    before = copy.deepcopy(model.state_dict())
    wsconvert.convert_model(model, gn=GN, skip_unnormalized=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_planning_leaves_an_hf_model_computing_the_same() -> None:
    """transformers installs output-capturing hooks on the first forward and records it in an attribute: the probe's
    forward pass must keep that attribute (removing it made DPT install the hooks twice and compute garbage)."""
    torch.manual_seed(0)
    model = dpt_hybrid().eval()
    twin = copy.deepcopy(model)
    wsconvert.plan_conversion(twin, gn=GN)  # the synthetic probe ran the model once
    hooks = sum(len(m._forward_hooks) for m in twin.modules())
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(twin(X).predicted_depth, model(X).predicted_depth, rtol=0, atol=0)
    assert sum(len(m._forward_hooks) for m in twin.modules()) == hooks
