"""Which trials are best: one rule for the report, the live line, the summary, export and the gate.

One objective: Optuna's ``best_trial`` (the best feasible COMPLETE trial). Several: the Pareto trials,
and as "the" best the Pareto trial best on the first objective (ties to the earlier trial).
"""

from __future__ import annotations

import optuna


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Optuna's rule: every constraint (``oom``, each ``objective.at_most`` limit) at 0 or below."""
    return all(v <= 0.0 for v in trial.constraints.values())


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials no other feasible trial beats on every objective (Optuna's ``best_trials``)."""
    try:
        return list(study.best_trials)
    except ValueError:
        return []


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The champion candidate, or None while no trial is complete and feasible."""
    if len(study.directions) == 1:
        try:
            return study.best_trial
        except ValueError:
            return None
    front = pareto_trials(study)
    if not front:
        return None
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
    return min(front, key=lambda t: (sign * t.values[0], t.number))
