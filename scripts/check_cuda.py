"""Correctness checks of wsconvert on a CUDA device (the test suite runs on CPU only; --device cpu dry-runs it).

Checks, on torchvision resnet50 converted with gn=32: recompute_in_backward gives the same gradients as
saving W_hat (fp32 and bf16 autocast); the eval cache and its short read path give the outputs of an
uncached model; a baked model is bitwise equal in eval; and one bf16 + channels_last training step is
finite. Exits 1 on the first failure. Usage: python scripts/check_cuda.py [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys

import torch
import torch.nn.functional as F
import torchvision

from wsconvert import WeightStandardization, bake, convert_model, recompute_in_backward


def grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    context = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with context:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return [p.grad.float().clone() for p in model.parameters()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    device = torch.device(parser.parse_args().device)
    torch.manual_seed(0)
    model = convert_model(torchvision.models.resnet50(num_classes=100), gn=32).to(device)
    x = torch.randn(8, 3, 128, 128, device=device)
    y = torch.randint(0, 100, (8,), device=device)

    recomputing = copy.deepcopy(model)
    recompute_in_backward(recomputing)
    # TF32 convolutions round W_hat to 10 mantissa bits: a last-bit difference between the forward's W_hat
    # (CUDA layer_norm kernel) and the rebuilt one ((W - mean) * rstd) can flip that rounding and grow to
    # ~1e-3 through 50 layers. Compare in full fp32 (and deterministic cuDNN), where only rounding remains.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    for amp in (False, True):
        worst = 0.0
        for expected, got in zip(grads(model, x, y, amp), grads(recomputing, x, y, amp), strict=True):
            worst = max(worst, ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item())
        limit = 1e-4  # under autocast the mode steps aside: only kernel nondeterminism is left
        assert worst < limit, f"amp={amp}: relative gradient error {worst:.2e} >= {limit}"
        print(f"recompute_in_backward gradients match saving W_hat (amp={amp}): worst relative error {worst:.1e}")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.deterministic = False

    model.eval()
    uncached = copy.deepcopy(model)
    for module in uncached.modules():
        if isinstance(module, WeightStandardization):
            module.cache = False
    with torch.no_grad():
        first, second, reference = model(x), model(x), uncached(x)
        assert torch.equal(first, second) and torch.equal(first, reference)
        print("eval cache + short read path: outputs bitwise equal to an uncached model")
        assert torch.equal(bake(model)(x), first)
        print("baked model: outputs bitwise equal in eval")

    model.train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss), loss
    print(f"bf16 autocast + channels_last training step: loss {loss.item():.4f}, finite")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print("all checks passed on", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
