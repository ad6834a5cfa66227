"""The knobs a trial may vary: one table of each knob's type, valid range and place in an XTuner config.

A knob's value for a trial is, in order: sampled (``search_space``), fixed (``fixed``), or the base
config's own, so a trial changes only what the spec says. Derived knobs: ``lora_alpha_ratio`` sets
``lora_alpha`` from ``lora_r``; ``max_iters`` replaces ``max_epochs``; ``mix_ratio`` is the share of
general rows ``sweep.data.mix`` mixes in (no config field). Epochs and iterations are written by
``sweep.xtuner.render`` with the learning-rate schedule stretched to them, the rest by ``write``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sweep.errors import SpecError

if TYPE_CHECKING:
    from sweep.spec import Spec

Path_ = tuple[str, ...]


@dataclass(frozen=True)
class Knob:
    name: str
    type: type
    low: float
    high: float
    low_in: bool = True  # whether ``low`` itself is allowed
    high_in: bool = True
    read: Path_ | None = None  # where an XTuner config holds the base value
    fallback: Path_ | None = None  # read here when ``read`` is missing
    default: Any = None  # when the base config has neither
    write: tuple[Path_, ...] = ()  # where ``write`` puts a trial's value (epochs/iterations: the renderer)
    top_level: bool = False  # XTuner's configs also keep it as a top-level variable: rewritten when present
    only_if_present: bool = False  # a knob of some configs only (LLaVA's vision tower): absent, not None, elsewhere


TABLE: tuple[Knob, ...] = (
    Knob("max_epochs", int, 1, 100_000, read=("train_cfg", "max_epochs"), top_level=True),
    # instead of max_epochs: a fixed number of iterations (benchmarks, huge data)
    Knob("max_iters", int, 1, 10**9, read=("train_cfg", "max_iters")),
    Knob("batch_size", int, 1, 65_536, read=("train_dataloader", "batch_size"),
         write=(("train_dataloader", "batch_size"),), top_level=True),
    Knob("accumulative_counts", int, 1, 65_536, read=("optim_wrapper", "accumulative_counts"), default=1,
         write=(("optim_wrapper", "accumulative_counts"),), top_level=True),
    Knob("lr", float, 0.0, 1.0, low_in=False, read=("optim_wrapper", "optimizer", "lr"),
         write=(("optim_wrapper", "optimizer", "lr"),), top_level=True),
    # a LLaVA config holds the LLM's LoRA as model.llm_lora, and may have one on the vision tower too
    Knob("lora_r", int, 1, 65_536, read=("model", "lora", "r"), fallback=("model", "llm_lora", "r"),
         write=(("model", "lora", "r"), ("model", "llm_lora", "r"))),
    Knob("lora_alpha", int, 1, 10**6, read=("model", "lora", "lora_alpha"), fallback=("model", "llm_lora", "lora_alpha"),
         write=(("model", "lora", "lora_alpha"), ("model", "llm_lora", "lora_alpha"))),
    Knob("lora_alpha_ratio", float, 0.0, 1024.0, low_in=False),
    Knob("lora_dropout", float, 0.0, 1.0, high_in=False, read=("model", "lora", "lora_dropout"),
         fallback=("model", "llm_lora", "lora_dropout"),
         write=(("model", "lora", "lora_dropout"), ("model", "llm_lora", "lora_dropout"))),
    Knob("visual_lora_r", int, 1, 65_536, read=("model", "visual_encoder_lora", "r"),
         write=(("model", "visual_encoder_lora", "r"),), only_if_present=True),
    Knob("visual_lora_alpha", int, 1, 10**6, read=("model", "visual_encoder_lora", "lora_alpha"),
         write=(("model", "visual_encoder_lora", "lora_alpha"),), only_if_present=True),
    Knob("mix_ratio", float, 0.0, 1.0, high_in=False, default=0.0),
    Knob("max_length", int, 16, 1_048_576, read=("train_dataloader", "dataset", "max_length"),
         fallback=("max_length",), top_level=True),
)  # fmt: skip
BY_NAME = {k.name: k for k in TABLE}

#: The type a value of each knob must have.
KNOBS: dict[str, type] = {k.name: k.type for k in TABLE}
#: Where each knob's values make sense: (low, high, low included, high included). A value outside fails the
#: spec at once, naming the key, instead of a trial that crashes or trains nothing hours later.
KNOB_RANGES: dict[str, tuple[float, float, bool, bool]] = {k.name: (k.low, k.high, k.low_in, k.high_in) for k in TABLE}


def check_knob(name: str, value: float) -> None:
    """Raise ValueError when a knob's value is outside its range."""
    low, high, low_in, high_in = KNOB_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: {value!r} is not a number")
    if value < low or value > high or (value == low and not low_in) or (value == high and not high_in):
        raise ValueError(f"{name}: {value!r} is outside {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}")


def _get(cfg: dict[str, Any], path: Path_) -> Any:
    node: Any = cfg
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def base_values(cfg: dict[str, Any]) -> dict[str, Any]:
    """The knob values a base XTuner config has, read from the fields XTuner's configs use."""
    values: dict[str, Any] = {}
    for knob in TABLE:
        if knob.read is None and knob.default is None:
            continue  # derived only (lora_alpha_ratio)
        value = _get(cfg, knob.read) if knob.read else None
        if not value and knob.fallback:
            value = _get(cfg, knob.fallback)
        if value is None and knob.only_if_present:
            continue
        values[knob.name] = value if value is not None and (value or knob.default is None) else knob.default
    return values


def trial_values(spec: Spec, sampled: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """All knob values of one trial: sampled over fixed over the base config's, derived ones filled in."""
    values = {**base, **spec.fixed, **sampled}
    ratio = values.pop("lora_alpha_ratio", None)
    if ratio is not None:
        values["lora_alpha"] = max(1, round(values["lora_r"] * ratio))
        values["lora_alpha_ratio"] = ratio
    if "max_iters" in spec.fixed or "max_iters" in spec.search_space:
        values["max_epochs"] = None  # the spec asks for iterations
    elif values.get("max_epochs") is not None:
        values["max_iters"] = None
    length = "max_epochs" if values.get("max_iters") is None else "max_iters"
    missing = [k for k in (length, "batch_size", "lr", "max_length") if values.get(k) is None]
    if missing:
        raise SpecError(f"base config {spec.base_config}: has no value for {missing}; set them under 'fixed'")
    if values.get("lora_r") is None:
        raise SpecError(f"base config {spec.base_config}: model.lora is missing; xtuner-sweep tunes LoRA adapters")
    asked = [k for k in ("visual_lora_r", "visual_lora_alpha") if k in spec.search_space or k in spec.fixed]
    if asked and base.get("visual_lora_r") is None:
        raise SpecError(
            f"{'search_space' if asked[0] in spec.search_space else 'fixed'}.{asked[0]}: base config "
            f"{spec.base_config} has no model.visual_encoder_lora (its vision tower is frozen, no LoRA to size)"
        )
    return values


def write(cfg: dict[str, Any], values: dict[str, Any]) -> None:
    """A trial's values into its config (in place), where the table says; unset optional knobs keep the base's."""
    for knob in TABLE:
        if knob.top_level and knob.name in cfg and knob.name in values:
            cfg[knob.name] = values[knob.name]
        value = values.get(knob.name)
        if knob.name == "accumulative_counts":
            value = value or 1
        if value is None:
            continue
        for path in knob.write:
            node = _get(cfg, path[:-1])
            if isinstance(node, dict):  # a chat config has no model.llm_lora, a LLaVA config no model.lora
                node[path[-1]] = knob.type(value)
