"""Demo: save a random-weight torchvision resnet18 checkpoint, convert it with the ``wsconvert`` command.

Writes ``out/demo/resnet18.pt`` (a plain state dict, random weights, nothing downloaded), runs
``python -m wsconvert out/demo/resnet18.pt --arch torchvision:resnet18 --gn 32 --force`` (which prints
the conversion report), then loads the result strictly into ``convert_model(resnet18(), gn=32)`` and
checks that it computes what converting the model in Python computes. Safe to rerun (``--force``
replaces the previous output). ``--out DIR`` picks another directory.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

import wsconvert

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert a random-weight resnet18 checkpoint with wsconvert.")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="where to write the checkpoints")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    source, target = args.out / "resnet18.pt", args.out / "resnet18.ws.pt"

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    torch.save(model.state_dict(), source)
    command = [
        sys.executable,
        "-m",
        "wsconvert",
        str(source),
        "--arch",
        "torchvision:resnet18",
        "--gn",
        "32",
        "--force",
    ]
    print("$ wsconvert " + " ".join(command[3:]), flush=True)
    completed = subprocess.run(command)
    if completed.returncode != 0:
        sys.exit(completed.returncode)

    converted = wsconvert.convert_model(torchvision.models.resnet18(weights=None), gn=32)
    converted.load_state_dict(torch.load(target, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    expected = wsconvert.convert_model(model, gn=32).eval()(x)
    out = converted.eval()(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    print(
        f"\n{target} loads with strict=True into convert_model(resnet18(), gn=32); output {tuple(out.shape)}, "
        f"finite={bool(torch.isfinite(out).all())}, identical to converting in Python"
    )


if __name__ == "__main__":
    main()
