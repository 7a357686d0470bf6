"""Model-zoo sweep: convert every torchvision model and a spread of timm models, and check the result.

For each model (random weights, nothing downloaded): build it, ``plan_conversion(gn=32, example_inputs=...)``,
``convert_model(gn=32)`` (a copy), then check with ``wsconvert.testing.check_conversion`` (docs/api.md)

- no BatchNorm / FrozenBatchNorm2d left;
- every activation still applied (forward-hook call counts on activation modules equal before and after,
  per module path, in an eval forward pass);
- nothing standardized twice (no timm StdConv2d/ScaledStdConv2d carrying our parametrization, no conv with
  more than one WeightStandardization);
- every conv and every BatchNorm-family layer appears in the report (converted or skipped with a reason),
  and the WS-parametrized convs are the ones the report counts as standardized;
- finite eval outputs; a forward and backward pass in training mode gives finite outputs and gradients;

and here:

- where torch.fx traces the model, the forward-hook probe finds the same unnormalized convs.

Models too large for a CPU test run (``HUGE``) are built on the meta device: every check runs there
(including the forward/backward pass, which checks shapes and activation calls) except finiteness.

Usage:
    python scripts/zoo_sweep.py                       # everything, table on stdout
    python scripts/zoo_sweep.py --only 'timm:*net*'   # a subset (fnmatch on the model id)
    python scripts/zoo_sweep.py --write docs/zoo.md   # regenerate the docs page
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torchvision import models as tvm
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wsconvert  # noqa: E402
from wsconvert import convert_model, plan_conversion  # noqa: E402
from wsconvert.probes.unnormalized import norm_types, probe_unnormalized  # noqa: E402
from wsconvert.testing import check_conversion  # noqa: E402

GN = 32

# Built on the meta device: hundreds of millions of parameters (vit_h_14: 632M, regnet_y_128gf: 645M).
HUGE = {"torchvision:vit_h_14", "torchvision:regnet_y_128gf"}


# --- the model list ----------------------------------------------------------------------------


@dataclass
class Entry:
    """One model: how to build it, its eval input, and its training-mode call (args of the forward)."""

    id: str
    family: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    train_inputs: Callable[[], tuple] | None = None  # defaults to ``inputs``
    meta: bool = False


def _image(size: int | tuple[int, int], batch: int = 1) -> Callable[[], tuple]:
    h, w = (size, size) if isinstance(size, int) else size
    return lambda: (torch.randn(batch, 3, h, w),)


# torchvision classification: input size and builder kwargs where the default 64x64 does not fit.
# inception_v3 trains its auxiliary head, whose fixed 5x5 pooling and conv need a 299x299 input.
_TV_CLASSIFICATION_SIZE = {"inception_v3": 299, "maxvit_t": 224}
_TV_CLASSIFICATION_KWARGS: dict[str, dict] = {
    "vit_b_16": {"image_size": 64},
    "vit_b_32": {"image_size": 64},
    "vit_l_16": {"image_size": 64},
    "vit_l_32": {"image_size": 64},
    "vit_h_14": {"image_size": 56},
}


def _build_classifier(name: str, kwargs: dict) -> nn.Module:
    if not name.startswith("regnet"):
        return tvm.get_model(name, **kwargs)
    # RegNet builders compute the stage widths with tensors and .tolist(): keep that on the CPU when the
    # model itself is built on the meta device.
    from torchvision.models import regnet

    original = regnet.BlockParams.__dict__["from_init_params"]

    def on_cpu(cls: type, *args: Any, **kw: Any) -> Any:
        with torch.device("cpu"):
            return original.__func__(cls, *args, **kw)

    regnet.BlockParams.from_init_params = classmethod(on_cpu)
    try:
        return tvm.get_model(name, **kwargs)
    finally:
        regnet.BlockParams.from_init_params = original


def _torchvision_classification() -> list[Entry]:
    entries = []
    for name in tvm.list_models(module=tvm):
        kwargs = {"weights": None, **_TV_CLASSIFICATION_KWARGS.get(name, {})}
        entries.append(
            Entry(
                f"torchvision:{name}",
                "torchvision classification",
                lambda name=name, kwargs=kwargs: _build_classifier(name, kwargs),
                _image(kwargs.get("image_size", _TV_CLASSIFICATION_SIZE.get(name, 64))),
                meta=f"torchvision:{name}" in HUGE,
            )
        )
    return entries


def _torchvision_segmentation() -> list[Entry]:
    entries = []
    for name in tvm.list_models(module=tvm.segmentation):
        kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None}
        if not name.startswith("lraspp"):
            kwargs["aux_loss"] = True
        entries.append(
            Entry(
                f"torchvision:{name}",
                "torchvision segmentation",
                lambda name=name, kwargs=kwargs: tvm.get_model(name, **kwargs),
                _image(64),
            )
        )
    return entries


_DETECTION_IMAGE = 64


def _detection_targets(name: str) -> list[dict[str, torch.Tensor]]:
    size = _DETECTION_IMAGE
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])}
    if "mask" in name:
        masks = torch.zeros(1, size, size, dtype=torch.uint8)
        masks[0, 8:48, 8:40] = 1
        target["masks"] = masks
    if "keypoint" in name:
        xs = torch.linspace(10, 38, 17)
        target["keypoints"] = torch.stack([xs, torch.linspace(10, 46, 17), torch.ones(17)], dim=1)[None]
    return [target]


def _detection_kwargs(name: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None}
    if not name.startswith("ssd"):  # SSD/SSDlite resize to a fixed 300/320 internally
        kwargs |= {"min_size": _DETECTION_IMAGE, "max_size": 96}
    if "rcnn" in name:  # fewer proposals and regions than the COCO defaults: a 64x64 image needs few
        kwargs |= _RCNN_SMALL
    return kwargs


_RCNN_SMALL = {
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 10,
}


def _frozen_bn_fasterrcnn() -> nn.Module:
    """Faster R-CNN whose ResNet-50 backbone uses FrozenBatchNorm2d, as torchvision builds it for COCO weights."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    backbone = tvm.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    return FasterRCNN(
        _resnet_fpn_extractor(backbone, 3), num_classes=91, min_size=_DETECTION_IMAGE, max_size=96, **_RCNN_SMALL
    )


def _torchvision_detection() -> list[Entry]:
    entries = []
    names = [(n, lambda n=n: tvm.get_model(n, **_detection_kwargs(n))) for n in tvm.list_models(module=tvm.detection)]
    names.append(("fasterrcnn_resnet50_fpn[FrozenBatchNorm2d]", _frozen_bn_fasterrcnn))
    for name, build in names:
        entries.append(
            Entry(
                f"torchvision:{name}",
                "torchvision detection",
                build,
                lambda: ([torch.rand(3, _DETECTION_IMAGE, _DETECTION_IMAGE)],),
                lambda name=name: ([torch.rand(3, _DETECTION_IMAGE, _DETECTION_IMAGE)], _detection_targets(name)),
            )
        )
    return entries


def _small_mvit(name: str) -> nn.Module:
    """MViT at 4 frames of 64x64: its builders hard-code 16x224x224, so the MViT class is wrapped while building."""
    from torchvision.models.video import mvit

    original = mvit.MViT

    def small(**kwargs: Any) -> nn.Module:
        return original(**(kwargs | {"spatial_size": (64, 64), "temporal_size": 4}))

    mvit.MViT = small
    try:
        return tvm.get_model(name, weights=None)
    finally:
        mvit.MViT = original


# S3D ends in a fixed AvgPool3d((2, 7, 7)): it needs 16 frames of 224x224.
_VIDEO_INPUT = {"s3d": (16, 224)}


def _torchvision_video() -> list[Entry]:
    entries = []
    for name in tvm.list_models(module=tvm.video):
        frames, size = _VIDEO_INPUT.get(name, (4, 64))
        if name.startswith("mvit"):
            build = lambda name=name: _small_mvit(name)  # noqa: E731
        else:
            build = lambda name=name: tvm.get_model(name, weights=None)  # noqa: E731
        entries.append(
            Entry(
                f"torchvision:{name}",
                "torchvision video",
                build,
                lambda frames=frames, size=size: (torch.randn(1, 3, frames, size, size),),
            )
        )
    return entries


# timm: (name, what it covers, input size, create_model kwargs). Input 64 unless the model needs more.
TIMM_MODELS: list[tuple[str, str, int, dict]] = [
    # plain BatchNorm2d
    ("resnet18", "plain BatchNorm", 64, {}),
    ("resnet50d", "plain BatchNorm, deep stem", 64, {}),
    ("seresnext26d_32x4d", "BatchNorm, grouped convs, SE", 64, {}),
    ("resnest14d", "split attention", 64, {}),
    ("vgg11_bn", "plain BatchNorm, VGG", 64, {}),
    ("tresnet_m", "BatchNormAct2d (leaky ReLU), anti-aliasing", 64, {}),
    # timm BatchNormAct2d
    ("efficientnet_b0", "BatchNormAct2d, SE, depthwise", 64, {}),
    ("tf_efficientnet_b0", "BatchNormAct2d, Conv2dSame padding", 64, {}),
    ("efficientnetv2_rw_t", "BatchNormAct2d, fused MBConv", 64, {}),
    ("mixnet_s", "BatchNormAct2d, mixed depthwise kernels", 64, {}),
    ("regnety_002", "BatchNormAct2d, SE", 64, {}),
    ("regnetx_002", "BatchNormAct2d, grouped convs", 64, {}),
    ("cspresnet50", "BatchNormAct2d, cross-stage partial", 64, {}),
    ("cspdarknet53", "BatchNormAct2d, cross-stage partial", 64, {}),
    ("cs3darknet_s", "BatchNormAct2d, CSP3", 64, {}),
    ("darknet53", "BatchNormAct2d", 64, {}),
    ("densenet121", "BatchNormAct2d, dense concat", 64, {}),
    ("rexnet_100", "BatchNormAct2d, SE", 64, {}),
    ("gcresnet50t", "BatchNormAct2d, global context", 64, {}),
    ("eca_resnet33ts", "BatchNormAct2d, ECA attention", 64, {}),
    ("hgnetv2_b0", "BatchNormAct2d, HGNet", 64, {}),
    # already standardized convs
    ("resnetv2_50x1_bit", "StdConv2d + GroupNormAct (BiT)", 64, {}),
    ("vit_small_r26_s32_224", "StdConv2dSame hybrid ResNet-ViT", 64, {"img_size": 64}),
    ("nfnet_l0", "ScaledStdConv2d, no norm layers", 64, {}),
    ("dm_nfnet_f0", "ScaledStdConv2dSame, no norm layers", 64, {}),
    ("nf_resnet26", "ScaledStdConv2d", 64, {}),
    ("eca_nfnet_l0", "ScaledStdConv2d, ECA", 64, {}),
    # no BatchNorm
    ("convnext_atto", "LayerNorm2d, no BatchNorm", 64, {}),
    ("convnext_nano", "LayerNorm2d, no BatchNorm", 64, {}),
    ("resnet50_gn", "GroupNorm already", 64, {}),
    ("regnetz_b16_evos", "EvoNorm", 64, {}),
    ("poolformer_s12", "GroupNorm1, pooling mixer", 64, {}),
    ("inception_next_atto", "BatchNorm + MLP", 64, {}),
    # conv + attention hybrids and transformers with conv stems
    ("mobilevit_xxs", "hybrid: MobileNet blocks + transformer", 64, {}),
    ("coatnet_nano_rw_224", "hybrid: MBConv + attention", 64, {"img_size": 64}),
    ("maxvit_nano_rw_256", "hybrid: MBConv + block/grid attention", 64, {"img_size": 64}),
    ("levit_128", "hybrid: BatchNorm on convs and linears", 64, {"img_size": 64}),
    ("efficientformer_l1", "hybrid: pooling + attention", 224, {}),
    ("edgenext_xx_small", "hybrid: depthwise + transposed attention", 64, {}),
    ("fastvit_t8", "hybrid: reparameterizable MobileOne blocks", 64, {}),
    ("efficientvit_b0", "hybrid: linear attention", 64, {}),
    ("vit_tiny_patch16_224", "ViT (conv patch embedding)", 64, {"img_size": 64}),
    ("deit_tiny_patch16_224", "DeiT (conv patch embedding)", 64, {"img_size": 64}),
    ("swin_tiny_patch4_window7_224", "Swin (conv patch embedding)", 64, {"img_size": 64}),
    ("pit_ti_224", "PiT: depthwise conv pooling", 64, {"img_size": 64}),
    ("coat_lite_tiny", "CoaT: conv position encoding", 64, {"img_size": 64}),
    ("xcit_nano_12_p16_224", "XCiT: BatchNorm in conv patch embedding", 64, {}),
    ("botnet26t_256", "BoTNet: self-attention in a ResNet", 64, {"img_size": 64}),
    ("halonet26t", "HaloNet: blocked local attention", 256, {}),
    ("lambda_resnet26t", "LambdaNet layers", 64, {}),
    ("visformer_tiny", "Visformer: BatchNorm in a transformer", 64, {"img_size": 64}),
    # depthwise-heavy mobile nets
    ("mobilenetv2_050", "depthwise, inverted residuals", 64, {}),
    ("mobilenetv3_small_050", "depthwise, SE, hard-swish", 64, {}),
    ("mobilenetv3_large_100", "depthwise, SE, hard-swish", 64, {}),
    ("mobilenetv4_conv_small", "depthwise, universal inverted bottleneck", 64, {}),
    ("mnasnet_050", "depthwise, NAS", 64, {}),
    ("fbnetv3_b", "depthwise, SE", 64, {}),
    ("ghostnet_100", "depthwise ghost modules", 64, {}),
    ("repghostnet_050", "depthwise, reparameterizable ghost", 64, {}),
    ("lcnet_050", "depthwise, PP-LCNet", 64, {}),
    ("mobileone_s0", "depthwise, reparameterizable branches", 64, {}),
    ("repvit_m1", "depthwise, RepViT", 64, {}),
    # multi-branch nets
    ("inception_v3", "multi-branch Inception", 96, {}),
    ("inception_v4", "multi-branch Inception", 96, {}),
    ("res2net50_26w_4s", "multi-scale branches", 64, {}),
    ("skresnet18", "selective kernel branches", 64, {}),
    ("selecsls42b", "SelecSLS concat branches", 64, {}),
    ("dla34", "deep layer aggregation", 64, {}),
    ("dpn68", "dual path (BatchNormAct2d)", 64, {}),
    ("hrnet_w18_small", "parallel multi-resolution branches", 64, {}),
    ("repvgg_a0", "RepVGG train-time branches", 64, {}),
    ("ese_vovnet19b_dw", "one-shot aggregation, depthwise", 64, {}),
    ("gernet_s", "GENet", 64, {}),
    ("xception41", "Xception separable convs", 64, {}),
]


def _timm_entries() -> list[Entry]:
    return [
        Entry(
            f"timm:{name}",
            f"timm: {covers}",
            lambda name=name, kwargs=kwargs: timm.create_model(name, pretrained=False, **kwargs),
            _image(size),
        )
        for name, covers, size, kwargs in TIMM_MODELS
    ]


def all_entries() -> list[Entry]:
    return (
        _torchvision_classification()
        + _torchvision_segmentation()
        + _torchvision_detection()
        + _torchvision_video()
        + _timm_entries()
    )


# --- the checks ------------------------------------------------------------------------------------


def _batchnorm_types() -> tuple[type, ...]:
    """Every BatchNorm-family type the conversion must remove."""
    from timm.layers import norm_act

    return (_BatchNorm, FrozenBatchNorm2d, norm_act.FrozenBatchNorm2d, norm_act.FrozenBatchNormAct2d)


def _first_paths(model: nn.Module, types: tuple[type, ...]) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, types)]


@dataclass
class Result:
    id: str
    family: str
    mode: str = "real"  # "real" or "meta"
    params_m: float = 0.0
    convs: int = 0
    standardized: int = 0
    convs_skipped: int = 0
    norms_replaced: int = 0
    norms_skipped: int = 0
    norms_kept: int = 0  # GroupNorm/LayerNorm/... left as they are by design
    group_fallbacks: int = 0
    pooled_norms: int = 0  # norm layers on one value per channel, given GroupNorm(1, C)
    unnormalized: int | None = None
    detection: str = ""
    activations: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        return "ok" if self.ok else "FAIL"


def _check(entry: Entry, result: Result) -> None:
    device = torch.device("meta") if entry.meta else torch.device("cpu")
    with torch.device(device) if entry.meta else contextlib.nullcontext():
        model = entry.build()
        inputs = entry.inputs()
        train_inputs = entry.train_inputs() if entry.train_inputs else inputs
    model.eval()
    result.params_m = sum(p.numel() for p in model.parameters()) / 1e6
    conv_paths = _first_paths(model, (_ConvNd,))
    bn_paths = set(_first_paths(model, _batchnorm_types()))
    kept_paths = [p for p, m in model.named_modules() if isinstance(m, norm_types()) and p not in bn_paths]
    result.convs, result.norms_kept = len(conv_paths), len(kept_paths)

    report = plan_conversion(model, gn=GN, example_inputs=inputs)
    if report.unnormalized_detection.startswith("torch.fx") and not entry.meta:
        # the two probe methods must agree where both work
        by_hooks = probe_unnormalized(model, inputs, method="hooks")
        by_fx = {u.path for u in report.unnormalized}
        if by_hooks.method != "hooks" or set(by_hooks.unnormalized) != by_fx:
            differ = sorted(set(by_hooks.unnormalized) ^ by_fx)[:3] if by_hooks.available else by_hooks.detail
            result.problems.append(f"fx and hook probes disagree on unnormalized convs: {differ}")
    # a converted copy: check_conversion compares it with the original (activation calls, paths)
    converted = convert_model(model, gn=GN, example_inputs=inputs)

    conv_set = set(conv_paths)
    result.standardized = sum(1 for c in report.converted if c.action == "standardized")
    result.norms_replaced = sum(1 for c in report.converted if c.action == "replaced")
    for s in report.skipped:
        if s.path in conv_set:
            result.convs_skipped += 1
        else:
            result.norms_skipped += 1
        reason = s.reason.split(" (")[0].split(";")[0]
        result.skip_reasons[reason] = result.skip_reasons.get(reason, 0) + 1
    result.group_fallbacks = len(report.group_fallbacks)
    result.pooled_norms = sum("has one value per channel" in note for note in report.notes)
    result.detection = report.unnormalized_detection
    result.unnormalized = len(report.unnormalized) if not result.detection.startswith("unavailable") else None

    # the invariants (wsconvert.testing.check_conversion): the report lists every conv and BatchNorm-family
    # layer and its standardized convs are the WS-parametrized ones; no BatchNorm left; nothing standardized
    # twice; every activation still applied (eval); a training-mode forward and backward with finite outputs
    # and gradients (finiteness not on the meta device)
    check = check_conversion(
        model, converted, inputs, train_inputs=train_inputs, report=report, gn=GN, raise_on_failure=False
    )
    result.activations = check.activations_before
    result.problems += [v.message for v in check.violations]


def run_entry(entry: Entry) -> Result:
    """Build, convert and check one model; every exception becomes a problem in the result."""
    result = Result(entry.id, entry.family, mode="meta" if entry.meta else "real")
    start = time.perf_counter()
    try:
        _check(entry, result)
    except Exception as error:  # report any failure of any model, keep sweeping
        lines = str(error).strip().splitlines()
        result.problems.append(f"{type(error).__name__}: {lines[0][:200] if lines else ''}")
    finally:
        gc.collect()
    result.seconds = time.perf_counter() - start
    return result


# --- output ------------------------------------------------------------------------------------------

# Why a model fails, for failures that are not wsconvert bugs (filled in from sweep runs).
KNOWN_CAUSES: dict[str, str] = {}

# Problems the sweep found and how they were fixed (regression tests named).
FIXED = [
    "timm resnest14d, rexnet_100, skresnet18 failed in training (`Expected more than 1 value per channel`): "
    "a BatchNorm after global pooling became GroupNorm(C, C) on one value per channel, which ignores its input. "
    "Fix: `wsconvert/pooled.py` measures each norm layer's values per channel on the example input and uses one "
    "group there (tests/test_pooled.py).",
    "timm resnetv2_50x1_bit: the fx probe treated `ConstantPad2d(value=0)` as a consumer while the hook probe "
    "passed `F.pad` through, so they disagreed on `stem.conv`. Fix: zero constant padding passes the scale in "
    "both, nonzero padding in neither (tests/test_probe.py::test_chains).",
    "torchvision inception_v3 failed at 96x96: its auxiliary head (run in training mode) needs 299x299; the "
    "sweep now uses 299 (a sweep input problem, not a wsconvert bug).",
]


def _unnormalized_cell(r: Result) -> str:
    if r.unnormalized is None:
        return "n/a"
    method = "fx" if r.detection.startswith("torch.fx") else "hooks"
    return f"{r.unnormalized} ({method})"


def markdown(results: list[Result], seconds: float, threads: int, load: tuple[float, float] | None = None) -> str:
    ok = sum(r.ok for r in results)
    lines = [
        "# Model-zoo sweep",
        "",
        "Generated by `python scripts/zoo_sweep.py --write docs/zoo.md` (do not edit by hand; the text around",
        "the table lives in the script). Every model is built with random weights (nothing downloaded),",
        f"converted with `convert_model(model, gn={GN})` and checked: no BatchNorm/FrozenBatchNorm2d left, every",
        "activation still applied (forward-hook call counts equal before and after), nothing standardized twice,",
        "every conv and BatchNorm-family layer accounted for in the report, a training-mode forward and",
        "backward pass with finite outputs and gradients, and, where torch.fx traces the model, the",
        "forward-hook probe finding the same unnormalized convs as fx. The slow test `tests/test_zoo.py`",
        "(`pytest -m slow`) runs the same checks. The sample input is passed to `plan_conversion` and",
        "`convert_model` (`example_inputs=`), which also sizes GroupNorm groups for pooled features.",
        "",
        f"Environment: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"wsconvert {wsconvert.__version__}, Python {platform.python_version()}, {threads} CPU thread(s).",
        "",
        f"**{ok} of {len(results)} models pass**; the sweep took {seconds / 60:.1f} min"
        + (
            f" on a {os.cpu_count()}-core machine shared with other jobs (1-minute load average {load[0]:.1f} at "
            f"the start, {load[1]:.1f} at the end)."
            if load
            else "."
        ),
        "",
        "Columns: *convs* = distinct conv modules; *WS* = convs given Weight Standardization; *conv skip* =",
        "convs skipped (reasons below); *norms* = BatchNorm-family layers replaced by GroupNorm(Act);",
        "*kept* = GroupNorm/LayerNorm/other norm layers the model already had (left as they are); *fallbacks*",
        f"= layers whose channel count is not divisible by {GN}, so fewer groups were used; *unnorm.* = convs",
        "whose output feeds no normalization layer (see docs/unnormalized.md), with the probe method;",
        "*mode* = `meta` for models built on the meta device (all checks except finiteness).",
        "",
        "| model | family | params (M) | convs | WS | conv skip | norms | kept | fallbacks | unnorm. | mode | "
        "status | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for r in results:
        status = r.status if r.ok else f"**FAIL**: {'; '.join(r.problems)}"
        lines.append(
            f"| {r.id} | {r.family} | {r.params_m:.1f} | {r.convs} | {r.standardized} | {r.convs_skipped} | "
            f"{r.norms_replaced} | {r.norms_kept} | {r.group_fallbacks} | {_unnormalized_cell(r)} | {r.mode} | "
            f"{status} | {r.seconds:.1f} |"
        )
    reasons: dict[str, int] = {}
    for r in results:
        for reason, count in r.skip_reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
    lines += ["", "## Skip reasons (all models)", "", "| reason | count |", "|---|---:|"]
    lines += [f"| {reason} | {count} |" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])]
    pooled = [r for r in results if r.pooled_norms]
    lines += [
        "",
        "## Norm layers on pooled features",
        "",
        "These models have BatchNorm layers that see one value per channel (after global pooling). With the",
        "sample input, wsconvert gives them `GroupNorm(1, C)`; without an input they would get the requested",
        "groups, which on one value per channel return the bias whatever the input (and raise in training",
        "with a batch of one). Convert them with `example_inputs=` / `input_shape=` (CLI `--input-shape`).",
        "Not all of these follow global pooling: the sweep's small inputs shrink late feature maps to 1x1",
        "(timm inception_v3/v4 at 96x96), and LeViT's BatchNorm1d runs on flattened tokens (N*T, C), where",
        "one group is a LayerNorm over each token. Convert with the input size the model runs at.",
        "",
    ]
    lines += [f"- {r.id}: {r.pooled_norms} layer(s)" for r in pooled] or ["None."]
    lines += ["", "## Fixed during the sweep", ""] + [f"- {item}" for item in FIXED]
    failures = [r for r in results if not r.ok]
    lines += ["", "## Failures", ""]
    if not failures:
        lines.append("None.")
    for r in failures:
        cause = KNOWN_CAUSES.get(r.id, "not analysed")
        lines.append(f"- **{r.id}**: {'; '.join(r.problems)}. Cause: {cause}")
    unavailable = [r for r in results if r.unnormalized is None]
    lines += ["", "## Unnormalized-conv detection", ""]
    fx = sum(r.detection.startswith("torch.fx") for r in results)
    hooks = sum(r.detection.startswith("forward hooks") for r in results)
    lines.append(
        f"torch.fx traced {fx} models; {hooks} needed the forward-hook probe on the sample input; "
        f"{len(unavailable)} had no detection."
    )
    for r in unavailable:
        lines.append(f"- {r.id}: {r.detection}")
    return "\n".join(lines) + "\n"


def _text_row(r: Result) -> str:
    return (
        f"{r.id:<52} {r.status:<4} {r.seconds:6.1f}s convs={r.convs} ws={r.standardized} skip={r.convs_skipped} "
        f"norms={r.norms_replaced} unnorm={_unnormalized_cell(r)} {'; '.join(r.problems)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="fnmatch pattern on model ids (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--write", type=Path, help="write the markdown table to this file")
    parser.add_argument("--list", action="store_true", help="list the model ids and exit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    entries = all_entries()
    if args.only:
        entries = [e for e in entries if any(fnmatch.fnmatchcase(e.id, p) for p in args.only)]
    if args.list:
        print("\n".join(e.id for e in entries))
        return 0
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    results = []
    for entry in entries:
        results.append(run_entry(entry))
        print(_text_row(results[-1]), flush=True)
    seconds = time.perf_counter() - start
    print(f"{sum(r.ok for r in results)}/{len(results)} ok in {seconds:.0f}s", flush=True)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(markdown(results, seconds, args.threads, (load_start, os.getloadavg()[0])))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
