"""The search space: what a trial's knob values are, from the sampler, the spec and the base config.

A knob that is neither searched nor fixed keeps the base config's value, so a trial changes only
what the spec says. Every knob value ends up as an MLflow param, sampled or not.
"""

from __future__ import annotations

from typing import Any

import optuna

from sweep.spec import CategoricalParam, FloatParam, IntParam, Spec, SpecError


def suggest(trial: optuna.trial.BaseTrial, spec: Spec) -> dict[str, Any]:
    """Ask the trial for a value of every searched knob."""
    values: dict[str, Any] = {}
    for name, p in spec.search_space.items():
        if isinstance(p, IntParam):
            values[name] = trial.suggest_int(name, p.low, p.high, step=p.step, log=p.log)
        elif isinstance(p, FloatParam):
            values[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
        elif isinstance(p, CategoricalParam):
            values[name] = trial.suggest_categorical(name, p.choices)
    return values


def first_point(spec: Spec) -> dict[str, Any]:
    """A deterministic point of the space (each range's low end), for `sweep validate`."""
    point: dict[str, Any] = {}
    for name, p in spec.search_space.items():
        point[name] = p.choices[0] if isinstance(p, CategoricalParam) else p.low
    return point


def base_values(cfg: dict[str, Any]) -> dict[str, Any]:
    """The knob values a base XTuner config has, read from the fields XTuner's configs use."""

    def get(*path: str) -> Any:
        node: Any = cfg
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    lora = get("model", "lora") or {}
    return {
        "max_epochs": get("train_cfg", "max_epochs"),
        "max_iters": get("train_cfg", "max_iters"),
        "batch_size": get("train_dataloader", "batch_size"),
        "accumulative_counts": get("optim_wrapper", "accumulative_counts") or 1,
        "lr": get("optim_wrapper", "optimizer", "lr"),
        "lora_r": lora.get("r"),
        "lora_alpha": lora.get("lora_alpha"),
        "lora_dropout": lora.get("lora_dropout"),
        "mix_ratio": 0.0,
        "max_length": get("train_dataloader", "dataset", "max_length") or cfg.get("max_length"),
    }


def trial_values(spec: Spec, sampled: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """All knob values of one trial: sampled over fixed over the base config's."""
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
    return values
