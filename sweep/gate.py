"""The test gate: a study's best trial becomes ``champion`` only if it beats the champion on the test split.

Selection (best checkpoint, best trial, Pareto front) only ever sees validation rows. The test split
is looked at once per candidate, here: the candidate's adapter and the current champion's are
scored on it with the same tokens and the same metric, the better one holds the alias, and the
numbers stay on the registered version (tags) and on the study's parent run (metrics), so the
MLflow UI shows why a version is or is not the champion.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from objectives import METRICS, is_better
from sweep.spec import ObjectiveSpec, Spec
from sweep.tracking import Tracker

log = logging.getLogger("sweep")
CHAMPION = "champion"


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials no other feasible trial beats on every objective (Optuna's ``best_trials``)."""
    try:
        return list(study.best_trials)
    except ValueError:
        return []


def best_trial(study: optuna.Study, objective: ObjectiveSpec) -> optuna.trial.FrozenTrial | None:
    """The champion candidate: the best trial, or for several objectives the Pareto trial best on the first."""
    if not objective.multi:
        try:
            return study.best_trial
        except ValueError:
            return None
    front = pareto_trials(study)
    if not front:
        return None
    sign = 1 if objective.primary_direction == "minimize" else -1
    return min(front, key=lambda t: (sign * t.values[0], t.number))


def gate_metric(objective: ObjectiveSpec) -> tuple[str, str]:
    """The test metric the gate compares: the test twin of the first objective metric that has one."""
    for name in objective.components:
        m = METRICS[name]
        if m.test_name:
            return m.test_name, m.direction
    return "test/loss", "minimize"


@dataclass
class GateResult:
    name: str
    version: str
    moved: bool
    reason: str
    candidate: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] | None = None
    champion_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "version": self.version, "alias": CHAMPION if self.moved else None}
        out.update(moved=self.moved, reason=self.reason, test=self.candidate)
        if self.champion_version is not None:
            out.update(champion_version=self.champion_version, champion_test=self.champion)
        return out


def promote(
    study: optuna.Study, spec: Spec, tracker: Tracker, data_dir: Path, parent_run_id: str | None
) -> GateResult | None:
    """Register the best trial's adapter; move ``champion`` to it only if it passes the test gate."""
    best = best_trial(study, spec.objective)
    if best is None:
        log.warning("study %s: no completed trial yet; nothing to register", spec.study)
        return None
    return gate_trial(best, spec, tracker, data_dir, parent_run_id)


def gate_trial(
    best: optuna.trial.FrozenTrial, spec: Spec, tracker: Tracker, data_dir: Path, parent_run_id: str | None
) -> GateResult | None:
    """Register one trial's adapter and let it challenge the champion on the test split."""
    adapter = best.user_attrs.get("adapter_path")
    run_id = best.user_attrs.get("mlflow_run_id")
    if not adapter or not Path(adapter).is_dir() or not run_id:
        log.warning("study %s: best trial %d has no adapter on disk; nothing registered", spec.study, best.number)
        return None
    name = spec.registered_model_name
    version = _register(best, spec, tracker, Path(adapter), run_id)
    current = tracker.champion(name, CHAMPION)
    if current is not None and current.version == version.version:
        log.info("study %s: trial %d is already %s (version %s)", spec.study, best.number, CHAMPION, version.version)
        return GateResult(name, str(version.version), True, "already the champion")

    result = GateResult(name, str(version.version), True, "")
    test_file = data_dir / "test.jsonl"
    metric, direction = gate_metric(spec.objective)
    if not test_file.is_file() or not test_file.read_text(encoding="utf-8").strip():
        result.reason = "no test split (data.test); the best trial by validation is the champion"
    else:
        log.info("study %s: test gate: scoring trial %d's adapter on %s", spec.study, best.number, test_file)
        config = Path(adapter) / "xtuner_config.py"
        result.candidate = _score(spec, Path(adapter), config, test_file)
        if current is None:
            result.reason = f"first champion; {metric} {result.candidate[metric]:.4f}"
        else:
            result.champion_version = str(current.version)
            result.champion = _score_version(spec, tracker, current.version, config, test_file)
            new, old = result.candidate[metric], (result.champion or {}).get(metric, float("nan"))
            result.moved = is_better(new, old, direction)
            verb = "beats" if result.moved else "does not beat"
            result.reason = f"{metric} {new:.4f} {verb} version {current.version}'s {old:.4f} ({direction})"
    _record(result, tracker, run_id, parent_run_id)
    if result.moved:
        _set_alias(tracker, name, result.version)
    log.info(
        "study %s: trial %d registered as %s version %s; %s %s: %s",
        spec.study, best.number, name, result.version, CHAMPION,
        "moved to it" if result.moved else "kept on version " + str(result.champion_version), result.reason,
    )  # fmt: skip
    return result


def _register(best: optuna.trial.FrozenTrial, spec: Spec, tracker: Tracker, adapter: Path, run_id: str):
    import mlflow

    from sweep.render import prompt_template
    from sweep.serving import log_chat_model

    name = spec.registered_model_name
    version = tracker.version_of_run(name, run_id)
    if version is not None:
        return version
    template = prompt_template(spec.model.template)
    uri = log_chat_model(
        run_id, tracker.uri, adapter, spec.model.path, template, spec.model.system, cpu_amp=spec.cpu_amp
    )
    mlflow.set_registry_uri(tracker.uri)
    mine = mlflow.register_model(uri, name, tags={"study": spec.study, "trial": str(best.number)})
    client = tracker.client
    client.set_model_version_tag(name, mine.version, "mlflow_run_id", run_id)
    for metric, value in zip(spec.objective.names, best.values, strict=True):
        client.set_model_version_tag(name, mine.version, metric, str(value))
    version = tracker.version_of_run(name, run_id)  # the oldest, if workers registered at once
    if int(version.version) != int(mine.version):
        client.delete_model_version(name, mine.version)
    return version


def _score(spec: Spec, adapter: Path, config: Path, test_file: Path) -> dict[str, float]:
    from sweep.render import prompt_template
    from sweep.scoring import score_adapter

    gen = spec.generation
    return score_adapter(
        adapter,
        spec.model.path,
        config,
        test_file,
        template=prompt_template(spec.model.template),
        system=spec.model.system,
        rouge=spec.scores_rouge,
        max_new_tokens=gen.max_new_tokens if gen else 48,
        quantize=spec.model.quantize,
        cpu_amp=spec.cpu_amp,
    )


def _score_version(spec: Spec, tracker: Tracker, version: str, config: Path, test_file: Path):
    """The champion's adapter, from the registry (it may come from another machine or an older run)."""
    import mlflow

    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(f"models:/{spec.registered_model_name}/{version}", dst_path=tmp)
        )
        found = sorted(p.parent for p in local.rglob("adapter_config.json"))
        if not found:
            log.warning("version %s has no adapter in the registry; it cannot defend the alias", version)
            return None
        try:
            return _score(spec, found[0], config, test_file)
        except Exception as err:  # noqa: BLE001 - e.g. an adapter of another base model
            log.warning(
                "version %s could not be scored on this base model (%s); it cannot defend the alias", version, err
            )
            return None


def _record(result: GateResult, tracker: Tracker, run_id: str, parent_run_id: str | None) -> None:
    client = tracker.client
    tags = {f"{k}": f"{v:.6g}" for k, v in result.candidate.items()}
    tags.update(gate="passed" if result.moved else "kept previous champion", gate_reason=result.reason)
    for key, value in tags.items():
        client.set_model_version_tag(result.name, result.version, key, value)
    step = int(result.version)
    tracker.log_metrics(run_id, [(k, v, 0) for k, v in result.candidate.items()])
    if parent_run_id:
        rows = [(k, v, step) for k, v in result.candidate.items()]
        rows += [(f"champion_{k}", v, step) for k, v in (result.champion or {}).items()]
        tracker.log_metrics(parent_run_id, rows)
        tracker.set_tags(parent_run_id, {"gate": tags["gate"], "gate_reason": result.reason})


def _set_alias(tracker: Tracker, name: str, version: str) -> None:
    for attempt in range(4):  # workers finishing together race to move the alias
        try:
            tracker.client.set_registered_model_alias(name, CHAMPION, version)
            return
        except Exception:  # noqa: BLE001
            if attempt == 3:
                raise
            time.sleep(1 + attempt)
