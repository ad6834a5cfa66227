"""`xtuner train` as its users run it: XTuner's tools/train.py main, plus the one shim XTuner 0.2.0 needs on
current torch (torch.cpu.is_bf16_supported, called on every device). The benchmark's baseline."""

import sys

import torch

if not hasattr(torch.cpu, "is_bf16_supported"):
    torch.cpu.is_bf16_supported = lambda *a, **k: False
from xtuner.tools import train  # noqa: E402

sys.argv = ["xtuner-train", *sys.argv[1:]]
train.main()
