"""The untrained (step-0) validation point, measured once per study and read by every later trial.

LoRA's B matrices start at zero, so at step 0 a trial's model computes exactly what the base model
does: with the same validation data, model and autocast (the cache key, ``sweep.xtuner.render``) the
point is the same for every trial, and measuring it again is wasted time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sweep import atomic


def applies(llm: Any) -> bool:
    """Whether the model is still its base model: every LoRA B all zero (one device sync)."""
    b = [linear.weight for m in llm.modules() if hasattr(m, "lora_B") for linear in m.lora_B.values()]
    return bool(b) and float(torch.stack([w.abs().max() for w in b]).max()) == 0.0


def read(path: Path) -> dict[str, Any] | None:
    """The stored point, or None when no trial of the study measured it yet."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def store(path: Path, metrics: dict[str, float], tables: dict[str, list[dict[str, Any]]]) -> None:
    """Trials that measured it at the same time write the same values, each through a temp file of its own.

    ``tables`` are the point's answer tables (``sweep.training.answers``), by table name.
    """
    point = {"metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, "tables": tables}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(point, ensure_ascii=False))
