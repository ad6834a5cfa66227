"""Which speed levers a trial uses on this machine: the spec's ``auto`` settings, decided once, on the sweep side.

``auto`` turns a lever on only where a GPU run showed it pays and the math stays the same
(docs/benchmarks.md): the fused loss where a fused kernel is installed and the model's head is a plain
projection, torch's fused optimizer step on CUDA. The decision is made here, before the config is rendered, so
the memory plan, the rendered config and the trial's start event all name the same choice.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

from sweep.trial.protocol import LOGIT_SCALING_KEYS

if TYPE_CHECKING:
    from sweep.spec import Spec
    from sweep.xtuner.render import Device

#: The package each GPU-only fused loss imports, and how to get it; ``auto`` prefers the first one installed.
FUSED_LOSS_PACKAGES = {"cce": ("cut_cross_entropy", "cut-cross-entropy"), "liger": ("liger_kernel", "liger-kernel")}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def scales_logits(model_dir: Path) -> str | None:
    """The config.json key that rescales or caps this model's logits (None: a plain head)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # preflight's model check says what is wrong with the folder
    configs = [config, config.get("text_config") or {}, config.get("llm_config") or {}]
    return next((k for c in configs for k in LOGIT_SCALING_KEYS if c.get(k) not in (None, 1, 1.0)), None)


def fused_loss(spec: Spec, device: Device | None) -> str:
    """``speed.fused_loss`` as this trial runs it: ``auto`` is a GPU kernel where one can run, else ``off``."""
    setting = spec.speed.fused_loss
    if setting != "auto":
        return setting
    if device is None or not device.cuda or scales_logits(spec.model.path):
        return "off"
    return next((impl for impl, (module, _) in FUSED_LOSS_PACKAGES.items() if installed(module)), "off")


#: The package ``speed.fused_kernels`` imports, and how to get it.
FUSED_KERNELS_PACKAGE = ("liger_kernel", "liger-kernel")


def fused_kernels(spec: Spec, device: Device | None) -> bool:
    """``speed.fused_kernels`` as this trial runs it: ``auto`` is on for CUDA where Liger-Kernel is installed."""
    setting = spec.speed.fused_kernels
    if setting != "auto":
        return setting == "on"
    return device is not None and device.cuda and installed(FUSED_KERNELS_PACKAGE[0])


def lora_input_16bit(spec: Spec, device: Device | None) -> bool:
    """``speed.lora_input_16bit`` as this trial runs it: ``auto`` is on for CUDA."""
    setting = spec.speed.lora_input_16bit
    return setting == "on" or (setting == "auto" and device is not None and device.cuda)


def fused_optimizer(spec: Spec, device: Device | None) -> bool:
    """``speed.fused_optimizer``: ``auto`` is on for CUDA (one kernel per step instead of a loop of them)."""
    setting = spec.speed.fused_optimizer
    return setting == "on" or (setting == "auto" and device is not None and device.cuda)
