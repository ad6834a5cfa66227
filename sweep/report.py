"""What a study found: a table for people, JSON for scripts. Read from Optuna's storage and MLflow."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import optuna


def study_report(study: optuna.Study, registered: dict[str, Any] | None) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    try:
        best_trial = study.best_trial
    except ValueError:
        best_trial = None
    best = None
    if best_trial is not None:
        best = {
            "number": best_trial.number,
            "value": best_trial.value,
            "params": best_trial.params,
            "best_step": best_trial.user_attrs.get("best_step"),
            "mlflow_run_id": best_trial.user_attrs.get("mlflow_run_id"),
            "adapter_path": best_trial.user_attrs.get("adapter_path"),
        }
    return {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "counts": {state.name: counts.get(state.name, 0) for state in optuna.trial.TrialState},
        "best": best,
        "registered": registered,
    }


def champion_info(tracker, name: str, alias: str = "champion") -> dict[str, Any] | None:
    mv = tracker.champion(name, alias)
    return None if mv is None else {"name": name, "version": str(mv.version), "alias": alias}


def trials_table(study: optuna.Study) -> str:
    """A plain-text table of every trial: state, value, best step, time, validation's share of it, parameters."""
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    head = ["#", "state", "value", "best_step", "last_step", "secs", "val%", *names]
    rows = []
    for t in trials:
        steps = sorted(t.intermediate_values)
        rows.append(
            [
                str(t.number),
                t.state.name,
                _fmt(t.value if t.value is not None else t.user_attrs.get("best_value")),
                str(t.user_attrs.get("best_step", "")),
                str(steps[-1]) if steps else "",
                str(t.user_attrs.get("seconds", "")),
                f"{100 * t.user_attrs['val_share']:.0f}" if "val_share" in t.user_attrs else "",
                *[_fmt(t.params.get(n)) for n in names],
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)
