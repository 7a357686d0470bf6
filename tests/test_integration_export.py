"""Export of converted models: bake first, then torch.export / torch.jit.trace / ONNX (issue 4, point 7).

A baked model has plain conv weights, so every exporter sees an ordinary network. Of the un-baked model:
torch.export, torch.jit.trace and the dynamo ONNX exporter trace through the parametrization and work (the
graph then recomputes the standardization at every call); torch.jit.script cannot, and wsconvert intercepts it
with an error that says to bake first.
"""

from __future__ import annotations

import onnxruntime as ort
import onnxscript  # noqa: F401 - the dynamo ONNX exporter needs it (test extra)
import pytest
import torch
import torchvision
from torch import nn

import wsconvert
from wsconvert.errors import UnsupportedModuleError

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::torch.jit.TracerWarning"
    ),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def converted() -> nn.Module:
    torch.manual_seed(0)
    model = wsconvert.convert_model(torchvision.models.resnet18(weights=None, num_classes=10), gn=32)
    with torch.no_grad():  # random GroupNorm affines, so a wrong weight cannot hide behind gamma=1, beta=0
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _run_onnx(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


EXPORTERS = {
    "torch.export": lambda model, x: torch.export.export(model, (x,)).module()(x),
    "jit.trace": lambda model, x: torch.jit.trace(model, (x,))(x),
    "onnx-dynamo+onnxruntime": _run_onnx,
}


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_baked_model_exports_with_equal_outputs(converted: nn.Module, x: torch.Tensor, exporter: str) -> None:
    with torch.no_grad():
        expected = converted(x)
        baked = wsconvert.bake(converted)
        assert not any(wsconvert.is_standardized(m) for m in baked.modules())
        got = EXPORTERS[exporter](baked, x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_unbaked_model_traces_through_the_parametrization(converted: nn.Module, x: torch.Tensor, exporter: str) -> None:
    """No error to intercept here: these exporters record the standardization ops (bake to leave them out)."""
    with torch.no_grad():
        torch.testing.assert_close(EXPORTERS[exporter](converted, x), converted(x), atol=1e-4, rtol=1e-4)


def test_jit_script_of_unbaked_model_says_to_bake_first(converted: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises(UnsupportedModuleError, match=r"wsconvert\.bake\(model\) first"):
        torch.jit.script(converted)
    scripted = torch.jit.script(wsconvert.bake(converted))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), converted(x), atol=1e-4, rtol=1e-4)


# --- preserve=True (issue 11) ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_and_preserved() -> tuple[nn.Module, nn.Module]:
    """A small trained-looking BatchNorm CNN (filters with a mean, statistics away from 0/1; a conv, a strided
    conv with bias, a ConvTranspose) and its gn=None preserve=True conversion, which computes the same function."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, stride=2, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                m.weight.mul_(0.3).add_(0.05)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    plain.eval()
    return plain, wsconvert.convert_model(plain, preserve=True).eval()


@pytest.mark.parametrize("baked", [False, True], ids=["unbaked", "baked"])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_preserve_exports_compute_the_original_function(plain_and_preserved, exporter: str, baked: bool) -> None:
    """The exported graph holds W_eff = gain * WS(W) + shift (un-baked: gain/shift as buffers, baked: in the
    weights), so it computes what the unconverted model does; without gain/shift it would not."""
    plain, preserved = plain_and_preserved
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = plain(x)
        model = wsconvert.bake(preserved).eval() if baked else preserved
        torch.testing.assert_close(EXPORTERS[exporter](model, x), expected, atol=1e-4, rtol=1e-4)
        naive = wsconvert.convert_model(plain).eval()
        assert not torch.allclose(naive(x), expected, atol=1e-2), "gain/shift must matter for this model"


def test_preserve_torch_export_keeps_gain_shift_as_buffers(plain_and_preserved) -> None:
    plain, preserved = plain_and_preserved
    program = torch.export.export(preserved, (torch.randn(1, 3, 16, 16),))
    expected = {k: v for k, v in preserved.state_dict().items() if k.endswith((".gain", ".shift"))}
    assert len(expected) == 6
    for key, value in expected.items():
        torch.testing.assert_close(program.state_dict[key], value, rtol=0, atol=0, msg=key)
    baked = torch.export.export(wsconvert.bake(preserved), (torch.randn(1, 3, 16, 16),))
    assert not any(k.endswith((".gain", ".shift")) for k in baked.state_dict)
    torch.testing.assert_close(baked.state_dict["0.weight"], plain[0].weight, atol=1e-6, rtol=1e-5)
