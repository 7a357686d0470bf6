"""Demo: convert a random-weight torchvision resnet18 to WS + GroupNorm(32) and print the report."""

from __future__ import annotations

import torch
import torchvision

import wsconvert


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    print(wsconvert.plan_conversion(model, gn=32))
    converted = wsconvert.convert_model(model, gn=32)
    converted.load_state_dict(model.state_dict(), strict=True)
    out = converted(torch.randn(2, 3, 64, 64))
    print(f"\nforward ok: output {tuple(out.shape)}, finite={bool(torch.isfinite(out).all())}")


if __name__ == "__main__":
    main()
