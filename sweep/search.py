"""The search: the space the spec defines, and the Optuna sampler and pruner that walk it.

A knob that is neither searched nor fixed keeps the base config's value (``sweep.knobs``). Every
knob value ends up as an MLflow param, sampled or not.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna

from sweep.spec import CategoricalParam, FloatParam, IntParam, Spec, SpecError

log = logging.getLogger("sweep")


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


def make_sampler(spec: Spec) -> optuna.samplers.BaseSampler:
    s = spec.sampler
    if s.type == "tpe":
        kw = {"n_startup_trials": s.n_startup_trials} if s.n_startup_trials is not None else {}
        return optuna.samplers.TPESampler(seed=s.seed, **kw)
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.type == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed)
    if s.type == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed)
    grid: dict[str, list] = {}
    for name, p in spec.search_space.items():
        if not hasattr(p, "choices"):
            raise SpecError(f"sampler.type grid: search_space.{name} must be categorical (a grid needs choices)")
        grid[name] = list(p.choices)
    return optuna.samplers.GridSampler(grid, seed=s.seed)


def make_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if spec.objective.multi:
        if p.type != "none" and "pruner" in spec.model_fields_set:
            log.warning("pruner: Optuna cannot prune a multi-objective study; trials run to the end")
        return optuna.pruners.NopPruner()
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.type == "percentile":
        return optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.eval_every)
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.eval_every)
    return optuna.pruners.NopPruner()
