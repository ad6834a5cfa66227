"""What a study found: a table for people, JSON for scripts. Read from Optuna's storage and MLflow.

Besides each trial's value: how its kept adapter answers (``val/repetition``, ``val/no_stop`` at its best step),
whether it is infeasible (an ``objective.at_most`` limit, or out of memory), and, when validation rows carry
groups, the step at which each group was at its best (``sweep.groups``): do edits of what the model knows need
more steps than new facts, on this data? And each trial's fit (``sweep.fit``: under-fitted, over-fitted since a
step, converged), with what the complete trials' verdicts suggest for the search space.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any

import optuna

from sweep import fit as fit_mod
from sweep.ranking import best_trial, feasible, pareto_trials
from sweep.spec import ObjectiveSpec


def objective_of(study: optuna.Study) -> ObjectiveSpec:
    """The objective a study was created with (saved with its spec)."""
    return ObjectiveSpec.model_validate((study.user_attrs.get("spec") or {}).get("objective") or {})


RUNAWAY = ("val/repetition", "val/no_stop")  # shown beside each trial's value, at its best step
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _trial_summary(t: optuna.trial.FrozenTrial, names: list[str]) -> dict[str, Any]:
    return {
        "number": t.number,
        "value": t.values[0] if t.values else None,
        "values": dict(zip(names, t.values, strict=True)) if t.values else None,
        "params": t.params,
        "best_step": t.user_attrs.get("best_step"),
        "value_se": t.user_attrs.get("best_value_se"),
        "fit": t.user_attrs.get("fit"),
        "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
        "adapter_path": t.user_attrs.get("adapter_path"),
        "at_best": t.user_attrs.get("metrics_at_best", {}),
        "group_best_steps": (t.user_attrs.get("group_best_steps") or {}).get("steps"),
        "feasible": feasible(t),
    }


def group_steps(trials: list[optuna.trial.FrozenTrial]) -> dict[str, Any] | None:
    """Per group of validation rows, the step at which each trial was best on it, and the median over the trials
    that ran to their end (a pruned trial's best is cut short by its stop); None when rows carry no groups."""
    recorded = {t.number: (t.state, t.user_attrs["group_best_steps"]) for t in trials
                if t.state in FINISHED and "group_best_steps" in t.user_attrs}  # fmt: skip
    if not recorded:
        return None
    metric = next(iter(recorded.values()))[1]["metric"]
    names = sorted({g for _, r in recorded.values() for g in r["steps"]})
    steps = {g: {n: r["steps"][g] for n, (_, r) in recorded.items() if g in r["steps"]} for g in names}
    complete = {n for n, (state, _) in recorded.items() if state == optuna.trial.TrialState.COMPLETE}
    median = {g: statistics.median(v for n, v in by.items() if n in complete) for g, by in steps.items()
              if any(n in complete for n in by)}  # fmt: skip
    return {"metric": metric, "steps": steps, "median_complete": median}


def study_report(
    study: optuna.Study, objective: ObjectiveSpec | None = None, registered: dict[str, Any] | None = None
) -> dict[str, Any]:
    objective = objective or objective_of(study)
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    best_t = best_trial(study)
    report: dict[str, Any] = {
        "study": study.study_name,
        "objective": objective.describe(),
        "direction": objective.primary_direction,
        "counts": {state.name: counts.get(state.name, 0) for state in optuna.trial.TrialState},
        "best": _trial_summary(best_t, objective.names) if best_t else None,
        "registered": registered,
    }
    if objective.multi:
        report["pareto"] = [
            _trial_summary(t, objective.names) for t in sorted(pareto_trials(study), key=lambda t: t.number)
        ]
    groups = group_steps(trials)
    if groups is not None:
        report["groups"] = groups
    report["fit"] = fit_summary(study)
    return report


def fit_summary(study: optuna.Study) -> dict[str, Any]:
    """Every finished trial's fit verdict, their counts over the complete trials, and what those suggest."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED and t.user_attrs.get("fit")]
    complete = [t.user_attrs["fit"]["verdict"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    space = (study.user_attrs.get("spec") or {}).get("search_space")
    keep = ((study.user_attrs.get("spec") or {}).get("objective") or {}).get("keep")
    return {
        "keep": keep or objective_of(study).keep,
        "trials": {str(t.number): t.user_attrs["fit"]["label"] for t in trials},
        "counts": dict(Counter(complete)),
        "suggestion": fit_mod.suggestion(complete, space),
    }


def champion_info(tracker, name: str, alias: str = "champion") -> dict[str, Any] | None:
    mv = tracker.champion(name, alias)
    if mv is None:
        return None
    info = {"name": name, "version": str(mv.version), "alias": alias, "reason": mv.tags.get("gate_reason", "")}
    untrained = _float_tags(mv.tags, "untrained_test/")
    if untrained:  # a LLaVA champion: its test scores beside the untrained model's (sweep.registry.gate)
        info["test"] = _float_tags(mv.tags, "test/")
        info["untrained_test"] = {k.removeprefix("untrained_"): v for k, v in untrained.items()}
    return info


def _float_tags(tags: dict[str, str], prefix: str) -> dict[str, float]:
    out = {}
    for key, value in tags.items():
        if key.startswith(prefix):
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return dict(sorted(out.items()))


def trials_table(study: optuna.Study) -> str:
    """A plain-text table of every trial: state, value(s), best step, repetition and runaway answers at that step,
    time, validation's share, per group the step it was best at, parameters; then the groups' medians."""
    objective = objective_of(study)
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    values_head = objective.names if objective.multi else ["value"]
    pareto = {t.number for t in pareto_trials(study)} if objective.multi else set()
    runaway = [m for m in RUNAWAY if any(m in t.user_attrs.get("metrics_at_best", {}) for t in trials)]
    groups = group_steps(trials)
    group_names = list(groups["steps"]) if groups else []
    head = ["#", "state", *values_head, "±se", "best_step", "last_step", "fit", *[m.removeprefix("val/") for m in runaway],
            "secs", "val%", *[f"best@{g}" for g in group_names], *names]  # fmt: skip
    rows = []
    for t in trials:
        steps = sorted(t.intermediate_values)
        # a pruned trial's value in Optuna is its last point; it is worth its best one (its adapter's), as the rest
        pruned = t.state == optuna.trial.TrialState.PRUNED and "best_value" in t.user_attrs
        values = list(t.values) if t.values and not pruned else [t.user_attrs.get("best_value")]
        values += [None] * (len(values_head) - len(values))
        state = t.state.name + ("*" if t.number in pareto else "") + ("" if feasible(t) else "!")
        at_best = t.user_attrs.get("metrics_at_best", {})
        by_group = groups["steps"] if groups else {}
        rows.append(
            [
                str(t.number),
                state,
                *[_fmt(v) for v in values],
                _fmt(t.user_attrs.get("best_value_se")),
                str(t.user_attrs.get("best_step", "")),
                str(steps[-1]) if steps else str(t.user_attrs.get("last_step", "")),
                (t.user_attrs.get("fit") or {}).get("label", ""),
                *[_fmt(at_best.get(m)) for m in runaway],
                str(t.user_attrs.get("seconds", "")),
                f"{100 * t.user_attrs['val_share']:.0f}" if "val_share" in t.user_attrs else "",
                *[str(by_group[g].get(t.number, "")) for g in group_names],
                *[_fmt(t.params.get(n)) for n in names],
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if pareto:
        lines.append("* on the Pareto front")
    if any(not feasible(t) for t in trials):
        lines.append("! infeasible: " + "; ".join(
            f"trial {t.number}: {t.user_attrs.get('infeasible') or t.user_attrs.get('reason') or 'a constraint'}"
            for t in trials if not feasible(t)))  # fmt: skip
    if runaway:
        lines.append(f"{', '.join(m.removeprefix('val/') for m in runaway)}: share of the validation answers at the "
                     "best step that repeat a phrase back to back / hit max_new_tokens without a stop word")  # fmt: skip
    fit = fit_summary(study)
    lines.append(f"best_step: the point kept by objective.keep={fit['keep']} (±se: its value's standard error); "
                 f"fit: {fit['suggestion']}")  # fmt: skip
    if groups:
        medians = ", ".join(f"{g} {v:g}" for g, v in groups["median_complete"].items())
        lines.append(f"best@GROUP: the step of each trial's best {groups['metric']}/GROUP; "
                     f"median over complete trials: {medians or 'none complete'}")  # fmt: skip
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)
