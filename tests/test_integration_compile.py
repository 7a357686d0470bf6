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


def test_compiled_model_matches_eager_and_does_not_recompile_while_training() -> None:
    torch._dynamo.reset()
    counters.clear()
    eager = wsconvert.convert_model(small_cnn(), gn=4)
    to_compile = copy.deepcopy(eager)
    initial = copy.deepcopy(eager.state_dict())
    compiled = torch.compile(to_compile)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    opt_compiled = torch.optim.SGD(to_compile.parameters(), lr=0.1, momentum=0.9)
    batches = [(torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,))) for _ in range(3)]

    for step, (x, y) in enumerate(batches):
        # the first step compiles; every later one must reuse that graph
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            out_compiled = _step(compiled, opt_compiled, x, y)
        out_eager = _step(eager, opt_eager, x, y)
        torch.testing.assert_close(out_compiled, out_eager, atol=1e-4, rtol=1e-4)
        for (name, p_c), p_e in zip(to_compile.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(p_c.grad, p_e.grad, atol=1e-4, rtol=1e-4, msg=f"step {step}: {name}")
        opt_compiled.step()
        opt_eager.step()

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
