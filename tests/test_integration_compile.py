"""torch.compile on a converted model: same numbers as eager, no recompiles while training (issue 4, point 3).

Compiling on two shared CPU cores is slow, so this file compiles one small conv + GroupNorm model once (forward
and backward) and checks everything on that compilation. compile + DDP is in test_integration_distributed.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import wsconvert

pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn() -> nn.Module:
    """A few bias-free convs (one grouped, one strided) with BatchNorm, as in a ResNet stem; tiny to compile fast."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad()
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    return out


def _train_like_eager(eager: nn.Module, to_compile: nn.Module, compiled: nn.Module) -> None:
    """Three SGD steps of the compiled model and of its eager twin: equal outputs and gradients at every step; the
    first step compiles, every later one must reuse that graph (error_on_recompile)."""
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    opt_compiled = torch.optim.SGD(to_compile.parameters(), lr=0.1, momentum=0.9)
    batches = [(torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,))) for _ in range(3)]
    for step, (x, y) in enumerate(batches):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            out_compiled = _step(compiled, opt_compiled, x, y)
        out_eager = _step(eager, opt_eager, x, y)
        torch.testing.assert_close(out_compiled, out_eager, atol=1e-4, rtol=1e-4)
        for (name, p_c), p_e in zip(to_compile.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(p_c.grad, p_e.grad, atol=1e-4, rtol=1e-4, msg=f"step {step}: {name}")
        opt_compiled.step()
        opt_eager.step()


def test_compiled_model_matches_eager_and_does_not_recompile_while_training() -> None:
    torch._dynamo.reset()
    counters.clear()
    eager = wsconvert.convert_model(small_cnn(), gn=4)
    to_compile = copy.deepcopy(eager)
    initial = copy.deepcopy(eager.state_dict())
    compiled = torch.compile(to_compile)
    _train_like_eager(eager, to_compile, compiled)

    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    for (name, p_c), p_e in zip(to_compile.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p_c, p_e, atol=1e-4, rtol=1e-4, msg=name)
    # the weights did train, so "no recompile" is about graphs that really saw changing parameters
    for name, value in to_compile.state_dict().items():
        assert not torch.equal(value, initial[name]), f"{name} did not train"


def test_compiled_eval_interleaved_with_eager_and_training_does_not_recompile() -> None:
    """The eval cache lives outside compiled graphs: eager forwards that fill it, optimizer steps that change W
    and train/eval switches must not trigger recompiles (dynamo guards are backend-independent: aot_eager)."""
    torch._dynamo.reset()
    counters.clear()
    model = wsconvert.convert_model(small_cnn(), gn=4)
    wsconvert.recompute_in_backward(model)  # its hooks must not add guards either
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,))

    def evaluate() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model.eval()  # clears the cache
        with torch.no_grad():
            # compiled with an empty cache, eager (which fills it), compiled again with a full one
            result = compiled(x), model(x), compiled(x)
        model.train()
        return result

    _step(compiled, optimizer, x, y)  # compiles the training graph
    optimizer.step()
    evaluate()  # compiles the eval graph (grad mode and training flag changed: expected)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            _step(compiled, optimizer, x, y)
            optimizer.step()
            before_fill, out_eager, after_fill = evaluate()
            torch.testing.assert_close(before_fill, out_eager, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(after_fill, out_eager, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs == 2, dict(counters["stats"])


# --- preserve=True (issue 11): gain/shift inside compiled graphs --------------------------------------------------


def trained_like(seed: int) -> nn.Module:
    """small_cnn with filters that have a mean and a small scale and BatchNorm statistics away from 0/1, as a
    trained model has (so gain/shift are far from 1/0), in eval mode."""
    torch.manual_seed(seed)
    model = small_cnn()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(0.3).add_(0.05 * (seed + 1))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def test_preserve_compiled_model_computes_the_original_function_and_sees_loaded_gain_shift() -> None:
    """gn=None: the compiled preserve model is the original function (gain/shift are in the graph); a plain
    checkpoint loaded afterwards (its gain/shift filled by the load hook, written in place) is seen by the same
    graph, without a recompile."""
    torch._dynamo.reset()
    counters.clear()
    plain, other = trained_like(0), trained_like(1)
    model = wsconvert.convert_model(copy.deepcopy(plain), preserve=True).eval()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x), atol=1e-5, rtol=1e-4)
        model.load_state_dict(other.state_dict())  # a plain, unconverted state dict
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = compiled(x)
        torch.testing.assert_close(got, other(x), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(got, plain(x), atol=1e-3)
        naive = wsconvert.convert_model(copy.deepcopy(other)).eval()  # no gain/shift: another function
        assert not torch.allclose(torch.compile(naive, backend="aot_eager")(x), other(x), atol=1e-2)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_preserve_compiled_training_matches_eager_and_does_not_recompile() -> None:
    """gn=4, preserve: compiled (inductor) outputs, gradients and SGD steps equal eager ones; gain/shift stay
    constant buffers."""
    torch._dynamo.reset()
    counters.clear()
    eager = wsconvert.convert_model(trained_like(0), gn=4, preserve=True).train()
    gain_shift = {k: v.clone() for k, v in eager.state_dict().items() if k.endswith((".gain", ".shift"))}
    assert len(gain_shift) == 4
    to_compile = copy.deepcopy(eager)
    compiled = torch.compile(to_compile)
    _train_like_eager(eager, to_compile, compiled)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"], dict(counters["stats"])
    state = to_compile.state_dict()
    for key, value in state.items():
        if key in gain_shift:
            torch.testing.assert_close(value, gain_shift[key], rtol=0, atol=0, msg=key)
        else:
            torch.testing.assert_close(value, eager.state_dict()[key], atol=1e-4, rtol=1e-4, msg=key)
