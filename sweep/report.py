"""What a study found: a table for people, JSON for scripts. Read from Optuna's storage and MLflow."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import optuna

from sweep.ranking import best_trial, pareto_trials
from sweep.spec import ObjectiveSpec


def objective_of(study: optuna.Study) -> ObjectiveSpec:
    """The objective a study was created with (saved with its spec)."""
    return ObjectiveSpec.model_validate((study.user_attrs.get("spec") or {}).get("objective") or {})


def _trial_summary(t: optuna.trial.FrozenTrial, names: list[str]) -> dict[str, Any]:
    return {
        "number": t.number,
        "value": t.values[0] if t.values else None,
        "values": dict(zip(names, t.values, strict=True)) if t.values else None,
        "params": t.params,
        "best_step": t.user_attrs.get("best_step"),
        "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
        "adapter_path": t.user_attrs.get("adapter_path"),
    }


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
    return report


def champion_info(tracker, name: str, alias: str = "champion") -> dict[str, Any] | None:
    mv = tracker.champion(name, alias)
    if mv is None:
        return None
    return {"name": name, "version": str(mv.version), "alias": alias, "reason": mv.tags.get("gate_reason", "")}


def trials_table(study: optuna.Study) -> str:
    """A plain-text table of every trial: state, value(s), best step, time, validation's share, parameters."""
    objective = objective_of(study)
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    values_head = objective.names if objective.multi else ["value"]
    pareto = {t.number for t in pareto_trials(study)} if objective.multi else set()
    head = ["#", "state", *values_head, "best_step", "last_step", "secs", "val%", *names]
    rows = []
    for t in trials:
        steps = sorted(t.intermediate_values)
        values = list(t.values) if t.values else [t.user_attrs.get("best_value")] + [None] * (len(values_head) - 1)
        state = t.state.name + ("*" if t.number in pareto else "")
        rows.append(
            [
                str(t.number),
                state,
                *[_fmt(v) for v in values],
                str(t.user_attrs.get("best_step", "")),
                str(steps[-1]) if steps else str(t.user_attrs.get("last_step", "")),
                str(t.user_attrs.get("seconds", "")),
                f"{100 * t.user_attrs['val_share']:.0f}" if "val_share" in t.user_attrs else "",
                *[_fmt(t.params.get(n)) for n in names],
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if pareto:
        lines.append("* on the Pareto front")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)
