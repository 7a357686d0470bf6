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

Third-party libraries (smp, MONAI, effdet, pytorchvideo, open_clip, transformers, ultralytics; ``THIRDPARTY``)
add their families only where the library is installed, built from constructors, configs or yaml files; an
entry's ``usage`` runs the library's own next step on the converted model (ultralytics: ``fuse()`` + predict).
Each model's ``output_scale`` (max |eval output| converted / original) is recorded, not checked.

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
import importlib.metadata
import importlib.util
import math
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
    library: str = ""  # the third-party library's label (THIRDPARTY); "" for torchvision and timm
    # the library's own use of the converted model (e.g. ultralytics' fuse() before predict); raises on failure
    usage: Callable[[nn.Module, tuple], None] | None = None
    usage_name: str = ""


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


# --- third-party libraries ---------------------------------------------------------------------------
#
# Each family is swept only where its library is installed (the sweep runs without them); every model is built
# from a constructor, config or yaml with random weights, nothing downloaded. Entry ids start with the label.

# (import name, distribution, label: the id prefix and the docs' name)
THIRDPARTY: list[tuple[str, str, str]] = [
    ("segmentation_models_pytorch", "segmentation-models-pytorch", "smp"),
    ("monai", "monai", "monai"),
    ("effdet", "effdet", "effdet"),
    ("pytorchvideo", "pytorchvideo", "pytorchvideo"),
    ("open_clip", "open-clip-torch", "open_clip"),
    ("transformers", "transformers", "transformers"),
    ("ultralytics", "ultralytics", "ultralytics"),
]


def library_installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (the fast suite collects the entries)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def library_versions() -> dict[str, str | None]:
    """``{label: installed version, or None when the library is missing}`` for the sweep's third-party libraries."""
    versions: dict[str, str | None] = {}
    for module, distribution, label in THIRDPARTY:
        version = None
        if library_installed(module):
            try:
                version = importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                version = "version unknown"
        versions[label] = version
    return versions


def _volume(channels: int, size: int, dims: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(1, channels, *([size] * dims)),)


def _smp_entries() -> list[Entry]:
    def build(arch: str, encoder: str) -> nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=3)

    models = [
        ("Unet", "resnet34", "U-Net, ResNet encoder"),
        ("FPN", "resnet34", "FPN decoder (GroupNorm in its head)"),
        ("DeepLabV3Plus", "resnet34", "ASPP with image pooling"),
        ("PSPNet", "resnet34", "pyramid pooling (1x1 bins)"),
        ("UnetPlusPlus", "resnet18", "nested dense skips"),
        ("Unet", "efficientnet-b0", "smp's own EfficientNet encoder"),
        ("Unet", "tu-efficientnet_b0", "timm-universal encoder (BatchNormAct2d)"),
        ("Segformer", "mit_b0", "Mix Transformer encoder"),
    ]
    return [
        Entry(
            f"smp:{arch}[{encoder}]",
            f"smp: {covers}",
            lambda arch=arch, encoder=encoder: build(arch, encoder),
            _image(64),
            library="smp",
        )
        for arch, encoder, covers in models
    ]


def _monai_net(name: str, dims: int) -> nn.Module:
    from monai.networks import nets

    if name == "UNet":
        return nets.UNet(dims, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="batch")
    if name == "UNet[instance]":  # MONAI's default norm
        return nets.UNet(dims, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    if name == "BasicUNet":
        return nets.BasicUNet(dims, 1, 2, features=(8, 8, 16, 16, 32, 8), norm="batch")
    if name == "SegResNet":
        return nets.SegResNet(dims, init_filters=8, in_channels=1, out_channels=2, norm="batch")
    if name == "DynUNet":
        return nets.DynUNet(
            dims, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[8, 16, 32],
            norm_name="batch", res_block=True,
        )  # fmt: skip
    if name == "DenseNet121":  # norm="batch" by default
        return nets.DenseNet121(dims, 1, 2, init_features=16, growth_rate=8)
    if name == "ResNet18":  # norm="batch" by default
        return nets.resnet18(spatial_dims=dims, n_input_channels=1, num_classes=2)
    raise ValueError(f"no MONAI entry {name!r}")


def _monai_entries() -> list[Entry]:
    """MONAI networks with BatchNorm (``norm="batch"`` where the constructor takes it), 2-D and 3-D, and one
    with MONAI's default instance norm, which is kept as it is (no BatchNorm to replace)."""
    models = [
        ("UNet", "residual units, norm='batch'"),
        ("UNet[instance]", "default norm: InstanceNorm, kept"),
        ("BasicUNet", "norm='batch'"),
        ("SegResNet", "pre-activation residual, norm='batch'"),
        ("DynUNet", "nnU-Net style, norm_name='batch'"),
        ("DenseNet121", "dense blocks, BatchNorm by default"),
        ("ResNet18", "BatchNorm by default"),
    ]
    entries = []
    for name, covers in models:
        base, bracket, variant = name.partition("[")
        for dims, size in ((2, 64), (3, 32)):
            if variant and dims == 2:
                continue
            entries.append(
                Entry(
                    f"monai:{base}-{dims}d{bracket}{variant}",
                    f"monai {dims}-D: {covers}",
                    lambda name=name, dims=dims: _monai_net(name, dims),
                    _volume(1, size, dims),
                    library="monai",
                )
            )
    return entries


_EFFDET_SIZE = 128  # effdet sizes its feature-map resampling from image_size: the input must match it


def _effdet_inputs() -> tuple:
    target = {
        "bbox": torch.tensor([[[16.0, 16.0, 80.0, 96.0]]]),  # yxyx, as effdet's loader gives it
        "cls": torch.tensor([[1.0]]),
        "img_scale": torch.tensor([1.0]),
        "img_size": torch.tensor([[_EFFDET_SIZE, _EFFDET_SIZE]]),
    }
    return torch.randn(1, 3, _EFFDET_SIZE, _EFFDET_SIZE), target


def _effdet(bench: str) -> nn.Module:
    import effdet

    size = (_EFFDET_SIZE, _EFFDET_SIZE)
    # bench_labeler: the bench assigns anchors to the target boxes itself (train.py --bench-labeler)
    kwargs = {"bench_labeler": True} if bench == "train" else {}
    return effdet.create_model(
        "efficientdet_d0", bench_task=bench, pretrained=False, pretrained_backbone=False, image_size=size, **kwargs
    )


def _effdet_entries() -> list[Entry]:
    return [
        Entry(
            "effdet:efficientdet_d0",
            "effdet: EfficientNet + BiFPN, separable convs",
            lambda: _effdet(""),
            _image(_EFFDET_SIZE),
            library="effdet",
        ),
        Entry(
            "effdet:efficientdet_d0[DetBenchTrain]",
            "effdet: the training bench (anchors, losses)",
            lambda: _effdet("train"),
            _effdet_inputs,
            library="effdet",
        ),
    ]


class _PathwayList(nn.Module):
    """Calls a SlowFast net with a fresh ``[slow, fast]`` list: its MultiPathWayWithFuse blocks (``inplace=True``)
    write their outputs into the input list, so one list cannot be fed twice (the sweep runs each input often)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
        return self.net([slow, fast])


def _pytorchvideo_net(name: str) -> nn.Module:
    """Small inputs (4 frames of 64x64; SlowFast 2 + 8): the head pooling kernels are sized for them."""
    from pytorchvideo.models import csn, resnet, slowfast, x3d

    if name == "create_resnet":
        return resnet.create_resnet(model_depth=50, model_num_class=10, head_pool_kernel_size=(4, 2, 2))
    if name == "create_x3d":
        return x3d.create_x3d(input_clip_length=4, input_crop_size=64, model_num_class=10, depth_factor=1.0)
    if name == "create_slowfast":
        return _PathwayList(slowfast.create_slowfast(model_num_class=10, head_pool_kernel_sizes=((2, 2, 2), (8, 2, 2))))
    if name == "create_csn":
        return csn.create_csn(model_num_class=10, head_pool_kernel_size=(1, 2, 2))
    raise ValueError(f"no pytorchvideo entry {name!r}")


def _pytorchvideo_entries() -> list[Entry]:
    clip = lambda: (torch.randn(1, 3, 4, 64, 64),)  # noqa: E731
    slow_fast = lambda: (torch.randn(1, 3, 2, 64, 64), torch.randn(1, 3, 8, 64, 64))  # noqa: E731
    models = [
        ("create_resnet", "3-D ResNet-50 (BatchNorm3d)", clip),
        ("create_x3d", "X3D: depthwise 3-D, SE, Swish", clip),
        ("create_slowfast", "SlowFast: two pathways, lateral fusion (list input, see _PathwayList)", slow_fast),
        ("create_csn", "channel-separated 3-D convs", clip),
    ]
    return [
        Entry(
            f"pytorchvideo:{name}",
            f"pytorchvideo: {covers}",
            lambda name=name: _pytorchvideo_net(name),
            inputs,
            library="pytorchvideo",
        )
        for name, covers, inputs in models
    ]


_CLIP_SIZE = 64


def _open_clip(name: str) -> nn.Module:
    import open_clip

    return open_clip.create_model(name, pretrained=None, force_image_size=_CLIP_SIZE)


def _modified_resnet() -> nn.Module:
    from open_clip.modified_resnet import ModifiedResNet

    return ModifiedResNet(layers=[1, 1, 1, 1], output_dim=64, heads=2, image_size=_CLIP_SIZE, width=32)


def _open_clip_entries() -> list[Entry]:
    def image_and_text() -> tuple:
        return torch.randn(1, 3, _CLIP_SIZE, _CLIP_SIZE), torch.randint(0, 49408, (1, 77))

    return [
        Entry(
            "open_clip:RN50",
            "open_clip: CLIP, ModifiedResNet image tower + text transformer",
            lambda: _open_clip("RN50"),
            image_and_text,
            library="open_clip",
        ),
        Entry(
            "open_clip:ModifiedResNet",
            "open_clip: the RN image tower built directly (attention pooling)",
            _modified_resnet,
            _image(_CLIP_SIZE),
            library="open_clip",
        ),
    ]


def _transformers_net(name: str) -> nn.Module:
    """Tiny configs of transformers' conv models (random weights, no hub access)."""
    import transformers as tf

    small = {"hidden_sizes": [32, 64, 64, 128], "depths": [1, 1, 1, 1], "num_labels": 10}
    if name == "BitForImageClassification":
        return tf.BitForImageClassification(tf.BitConfig(embedding_size=32, num_groups=8, **small))
    if name == "ResNetForImageClassification":
        return tf.ResNetForImageClassification(tf.ResNetConfig(embedding_size=16, **small))
    if name == "ConvNextForImageClassification":
        return tf.ConvNextForImageClassification(tf.ConvNextConfig(**small))
    if name == "RegNetForImageClassification":
        return tf.RegNetForImageClassification(tf.RegNetConfig(embedding_size=16, groups_width=8, **small))
    if name == "DPTForDepthEstimation[hybrid]":
        backbone = tf.BitConfig(
            global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], hidden_sizes=[32, 64, 128],
            embedding_size=32, num_groups=8, out_features=["stage1", "stage2", "stage3"],
            embedding_dynamic_padding=True,
        )  # fmt: skip
        config = tf.DPTConfig(
            is_hybrid=True, backbone_config=backbone, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
            intermediate_size=64, image_size=64, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[32, 64, 32, 32], fusion_hidden_size=32, backbone_featmap_shape=[1, 128, 4, 4],
            reassemble_factors=[1, 1, 1, 0.5],
        )  # fmt: skip
        return tf.DPTForDepthEstimation(config)
    if name == "DetrForObjectDetection[resnet]":
        backbone = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1],
                                   out_features=["stage4"])  # fmt: skip
        config = tf.DetrConfig(
            backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64,
            decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, num_labels=3,
        )  # fmt: skip
        return tf.DetrForObjectDetection(config)
    raise ValueError(f"no transformers entry {name!r}")


def _transformers_entries() -> list[Entry]:
    models = [
        ("BitForImageClassification", "BiT: WeightStandardizedConv2d + GroupNorm"),
        ("ResNetForImageClassification", "ResNet, BatchNorm2d"),
        ("ConvNextForImageClassification", "ConvNeXt, LayerNorm"),
        ("RegNetForImageClassification", "RegNet, BatchNorm2d, SE"),
        ("DPTForDepthEstimation[hybrid]", "DPT-hybrid: BiT backbone + ViT + conv neck"),
        ("DetrForObjectDetection[resnet]", "DETR, transformers ResNet backbone (frozen BN)"),
    ]
    return [
        Entry(
            f"transformers:{name}",
            f"transformers: {covers}",
            lambda name=name: _transformers_net(name),
            _image(64),
            library="transformers",
        )
        for name, covers in models
    ]


def _ultralytics_net(yaml: str) -> nn.Module:
    from ultralytics import YOLO

    return YOLO(yaml).model  # built from the packaged yaml, random weights, offline


def _ultralytics_fuse_and_predict(converted: nn.Module, inputs: tuple) -> None:
    """What ultralytics' predict, val and export do first, the documented way (docs/ecosystem.md): fuse with
    ``wsconvert.integrations.ultralytics.fuse`` (what ``model.fuse()`` runs after ``convert_yolo``), then an eval
    forward. Plain ``model.fuse()`` cannot fold a GroupNorm into the conv before it."""
    from wsconvert.integrations.ultralytics import fuse

    fuse(converted, verbose=False)
    converted.eval()
    with torch.no_grad():
        if not math.isfinite(_max_abs(converted(*inputs))):
            raise FloatingPointError("non-finite output after fuse()")


def _ultralytics_entries() -> list[Entry]:
    return [
        Entry(
            f"ultralytics:{name}",
            f"ultralytics: {covers}",
            lambda name=name: _ultralytics_net(f"{name}.yaml"),
            _image(64),
            library="ultralytics",
            usage=_ultralytics_fuse_and_predict,
            usage_name="wsconvert.integrations.ultralytics.fuse() + predict forward",
        )
        for name, covers in (
            ("yolov8n", "YOLOv8 DetectionModel (Conv = conv + bn + act, DFL)"),
            ("yolo11n", "YOLO11 DetectionModel (C3k2, attention)"),
        )
    ]


_THIRDPARTY_ENTRIES: dict[str, Callable[[], list[Entry]]] = {
    "smp": _smp_entries,
    "monai": _monai_entries,
    "effdet": _effdet_entries,
    "pytorchvideo": _pytorchvideo_entries,
    "open_clip": _open_clip_entries,
    "transformers": _transformers_entries,
    "ultralytics": _ultralytics_entries,
}


def thirdparty_entries() -> list[Entry]:
    """The third-party families whose library is installed (a missing library adds nothing)."""
    entries = []
    for module, _, label in THIRDPARTY:
        if library_installed(module):
            entries += _THIRDPARTY_ENTRIES[label]()
    return entries


def all_entries() -> list[Entry]:
    return (
        _torchvision_classification()
        + _torchvision_segmentation()
        + _torchvision_detection()
        + _torchvision_video()
        + _timm_entries()
        + thirdparty_entries()
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
    output_scale: float | None = None  # max |eval output| converted / original (random weights)
    library: str = ""
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
    if not entry.meta:
        result.output_scale = _output_scale(model, converted, inputs)
    if entry.usage is not None:  # last: it may change the converted model
        try:
            entry.usage(converted, inputs)
        except Exception as error:
            text = (str(error).strip().splitlines() or [""])[0][:200]
            result.problems.append(f"{entry.usage_name} raised {type(error).__name__}: {text}")


def _max_abs(outputs: object) -> float:
    from torch.utils._pytree import tree_flatten

    tensors = [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return max((t.detach().abs().max().item() for t in tensors if t.numel()), default=0.0)


def _output_scale(model: nn.Module, converted: nn.Module, inputs: tuple) -> float | None:
    """max |output| of the converted model over the original's, in eval mode. With random weights WS rescales
    every conv that feeds no norm layer, so 1-100x is ordinary; a huge ratio means outputs explode."""
    model.eval(), converted.eval()
    with torch.no_grad():
        before, after = _max_abs(model(*inputs)), _max_abs(converted(*inputs))
    return after / before if before > 0 else None


def run_entry(entry: Entry) -> Result:
    """Build, convert and check one model; every exception becomes a problem in the result."""
    result = Result(entry.id, entry.family, mode="meta" if entry.meta else "real", library=entry.library)
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


_TABLE_HEAD = [
    "| model | family | params (M) | convs | WS | conv skip | norms | kept | fallbacks | unnorm. | out x | mode | "
    "status | s |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|---:|",
]


def _scale_cell(r: Result) -> str:
    return "n/a" if r.output_scale is None else f"{r.output_scale:.2g}"


def _table(results: list[Result]) -> list[str]:
    lines = list(_TABLE_HEAD)
    for r in results:
        status = r.status if r.ok else f"**FAIL**: {'; '.join(r.problems)}"
        lines.append(
            f"| {r.id} | {r.family} | {r.params_m:.{1 if r.params_m >= 1 else 2}f} | {r.convs} | {r.standardized} | "
            f"{r.convs_skipped} | "
            f"{r.norms_replaced} | {r.norms_kept} | {r.group_fallbacks} | {_unnormalized_cell(r)} | "
            f"{_scale_cell(r)} | {r.mode} | {status} | {r.seconds:.1f} |"
        )
    return lines


def _versions_text(versions: dict[str, str | None]) -> str:
    found = [f"{label} {version}" for label, version in versions.items() if version]
    missing = [label for label, version in versions.items() if not version]
    text = ", ".join(found) if found else "none"
    return text + (f" (not installed, not swept: {', '.join(missing)})" if missing else "")


def _thirdparty_section(results: list[Result], versions: dict[str, str | None]) -> list[str]:
    ok = sum(r.ok for r in results)
    lines = [
        "",
        "## Third-party libraries",
        "",
        "Models of third-party model libraries, built the same way (random weights, from",
        "their constructors, configs or yaml files, nothing downloaded) and checked with the same invariants.",
        "A library's family is swept only where the library is installed (`pip install -e '.[thirdparty]'`);",
        "the sweep runs without them. Entries with a *usage* check also run the library's own next step on the",
        "converted model: for ultralytics, `wsconvert.integrations.ultralytics.fuse()` (what a converted model's",
        "`fuse()` runs; predict, val and export call it first) and an eval forward. Recipes and limits per",
        "library: [ecosystem.md](ecosystem.md).",
        "",
        f"Libraries: {_versions_text(versions)}.",
        "",
        f"**{ok} of {len(results)} third-party models pass.** *out x* (here and in the table above) = the largest",
        "|eval output| of the converted model over the original's; recorded, not checked. With random weights it",
        "says little about trained models: WS gives every filter zero mean and unit variance, so a conv that feeds",
        "no norm layer changes its output scale, and chains of them multiply (VGG without BatchNorm, SqueezeNet,",
        "DPT-hybrid's conv neck: 1e16 to 1e23). Where the factor comes from unnormalized convs,",
        "`skip_unnormalized=True` (`--skip-unnormalized`, docs/unnormalized.md) leaves them as they are (DPT-hybrid:",
        "factor 1.0).",
        "",
    ]
    return lines + (_table(results) if results else ["No third-party library is installed."])


def markdown(
    results: list[Result],
    seconds: float,
    threads: int,
    load: tuple[float, float] | None = None,
    versions: dict[str, str | None] | None = None,
) -> str:
    ok = sum(r.ok for r in results)
    versions = library_versions() if versions is None else versions
    core = [r for r in results if not r.library]
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
        f"wsconvert {wsconvert.__version__}, Python {platform.python_version()}, {threads} CPU thread(s); "
        f"third-party: {_versions_text(versions)}.",
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
        "*out x* = max |eval output| converted / original (see the third-party section); *mode* = `meta` for",
        "models built on the meta device (all checks except finiteness and *out x*). torchvision and timm",
        "models here; other libraries' models in [Third-party libraries](#third-party-libraries).",
        "",
        *_table(core),
    ]
    lines += _thirdparty_section([r for r in results if r.library], versions)
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
