"""Models of segmentation_models_pytorch, MONAI, effdet, pytorchvideo and open_clip (random weights, built from
their constructors, nothing downloaded): ``convert_model(gn=32)`` passes ``check_conversion``, the original state
dict loads strictly into a fresh conversion and computes what converting the trained model computes, ``bake``
computes what the converted model computes, and every activation (the library's own activation modules included)
still runs. The whole zoo of these libraries is in scripts/zoo_sweep.py (docs/zoo.md, Third-party libraries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from _thirdparty import needs
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close
from torch.utils._pytree import tree_flatten

from wsconvert import bake, convert_model, plan_conversion
from wsconvert.testing import check_conversion

pytestmark = pytest.mark.usefixtures("one_thread")

GN = 32


@dataclass(frozen=True)
class Case:
    library: str  # the module needs() imports (skips without it, fails under CI)
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    activations: tuple[str, ...] = ()  # the library's own activation classes, "module:Class"


def _smp_unet() -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(64, 32, 16), classes=2)


def _smp_fpn_timm_universal() -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.FPN("tu-resnet10t", encoder_weights=None, decoder_pyramid_channels=32, decoder_segmentation_channels=32)


def _monai_unet_2d() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="batch")


def _monai_dynunet_3d() -> nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(
        3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[8, 16, 32],
        norm_name="batch", act_name="swish", res_block=True,
    )  # fmt: skip


def _efficientdet_d0() -> nn.Module:
    import effdet

    return effdet.create_model("efficientdet_d0", pretrained=False, pretrained_backbone=False, image_size=(64, 64))


def _x3d() -> nn.Module:
    from pytorchvideo.models.x3d import create_x3d

    return create_x3d(input_clip_length=4, input_crop_size=32, model_num_class=5, width_factor=1.0, depth_factor=1.0)


def _modified_resnet() -> nn.Module:
    from open_clip.modified_resnet import ModifiedResNet

    return ModifiedResNet(layers=[1, 1, 1, 1], output_dim=32, heads=2, image_size=64, width=32)


CASES = {
    "smp-Unet-resnet18": Case("segmentation_models_pytorch", _smp_unet, lambda: (torch.randn(2, 3, 32, 32),)),
    "smp-FPN-tu-resnet10t": Case(
        "segmentation_models_pytorch", _smp_fpn_timm_universal, lambda: (torch.randn(2, 3, 64, 64),)
    ),
    "monai-UNet-2d-batch": Case("monai", _monai_unet_2d, lambda: (torch.randn(2, 1, 32, 32),)),
    "monai-DynUNet-3d-batch": Case(
        "monai",
        _monai_dynunet_3d,
        lambda: (torch.randn(1, 1, 16, 16, 16),),
        ("monai.networks.blocks.activation:Swish", "monai.networks.blocks.activation:MemoryEfficientSwish"),
    ),
    "effdet-efficientdet_d0": Case("effdet", _efficientdet_d0, lambda: (torch.randn(1, 3, 64, 64),)),
    "pytorchvideo-x3d": Case(
        "pytorchvideo", _x3d, lambda: (torch.randn(1, 3, 4, 32, 32),), ("pytorchvideo.layers.swish:Swish",)
    ),
    "open_clip-ModifiedResNet": Case("open_clip", _modified_resnet, lambda: (torch.randn(2, 3, 64, 64),)),
}
IDS = list(CASES)


def _case(name: str) -> Case:
    case = CASES[name]
    needs(case.library)
    return case


def _types(names: tuple[str, ...]) -> tuple[type, ...]:
    import importlib

    return tuple(getattr(importlib.import_module(module), cls) for module, cls in (n.split(":") for n in names))


def _activation_calls(model: nn.Module, inputs: tuple, extra: tuple[type, ...]) -> dict[str, int]:
    """Calls per module path of torch's activation modules and the library's own ones, in one eval forward."""
    calls: dict[str, int] = {}
    handles = []
    for path, module in model.named_modules():
        cls = parametrize.type_before_parametrizations(module)
        if cls.__module__ == "torch.nn.modules.activation" and cls is not nn.MultiheadAttention or cls in extra:
            calls[path] = 0
            handles.append(module.register_forward_hook(lambda *_, path=path: calls.__setitem__(path, calls[path] + 1)))
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [t for t in tree_flatten(model(*inputs))[0] if isinstance(t, torch.Tensor)]


def _trained_like(model: nn.Module) -> nn.Module:
    """Non-default values in every floating-point tensor (running_var positive), as a trained model has."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                fill = torch.rand_like(tensor) + 0.5 if "running_var" in name else torch.randn_like(tensor) * 0.2
                tensor.copy_(fill)
    return model


@pytest.mark.parametrize("name", IDS)
def test_conversion_passes_check_conversion_and_keeps_every_activation(name: str) -> None:
    case = _case(name)
    model = case.build().eval()
    x = case.inputs()
    report = plan_conversion(model, gn=GN, example_inputs=x)
    converted = convert_model(model, gn=GN, example_inputs=x)

    check = check_conversion(model, converted, x, report=report, gn=GN)  # raises ConversionCheckError
    assert check.standardized > 0 and check.batchnorms > 0
    assert check.standardized == sum(c.action == "standardized" for c in report.converted)
    extra = _types(case.activations)
    before, after = _activation_calls(model, x, extra), _activation_calls(converted, x, extra)
    assert sum(before.values()) > 0
    assert after == before
    if extra:  # the library's own activations are there and still run
        own = [p for p, m in model.named_modules() if isinstance(m, extra)]
        assert own and all(after[p] > 0 for p in own)


@pytest.mark.parametrize("name", IDS)
def test_original_state_dict_loads_strictly_and_computes_like_converting_the_trained_model(name: str) -> None:
    case = _case(name)
    x = case.inputs()
    trained = _trained_like(case.build()).eval()
    expected = convert_model(trained, gn=GN, example_inputs=x)

    fresh = convert_model(case.build(), gn=GN, example_inputs=x)
    result = fresh.load_state_dict(trained.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    got, want = _outputs(fresh, x), _outputs(expected, x)
    assert want and all(torch.isfinite(t).all() for t in want if t.is_floating_point())
    assert_close(got, want)

    # and the converted state dict round-trips into another fresh conversion
    again = convert_model(case.build(), gn=GN, example_inputs=x)
    again.load_state_dict(fresh.state_dict(), strict=True)
    assert_close(_outputs(again, x), want)


@pytest.mark.parametrize("name", IDS)
def test_bake_computes_what_the_converted_model_computes(name: str) -> None:
    case = _case(name)
    x = case.inputs()
    converted = convert_model(_trained_like(case.build()), gn=GN, example_inputs=x)
    baked = bake(converted)
    assert not any(parametrize.is_parametrized(m) for m in baked.modules())
    assert any(parametrize.is_parametrized(m) for m in converted.modules())  # bake copied, did not touch it
    assert_close(_outputs(baked, x), _outputs(converted, x))
