"""Optuna callbacks of a sweep: a dead worker's trial queued again, the disk budget for adapters, and MLflow's
model logging made ready while trials train."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import optuna

from sweep import data as data_mod
from sweep.ranking import feasible, pareto_trials
from sweep.registry.locks import adapter_removal
from sweep.registry.tracking import Tracker

log = logging.getLogger("sweep")


class StaleTrialCallback:
    """A trial whose worker died: queue it again (Optuna's retry callback) and end its MLflow run as KILLED."""

    def __init__(self, tracking_uri: str | None) -> None:
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.retry(study, trial)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and self.tracking_uri:
            tracker = Tracker(self.tracking_uri)
            tracker.set_tags(run_id, {"state": "FAIL", "reason": "worker lost (no heartbeat)"})
            tracker.finish(run_id, "KILLED")
        log.warning("trial %d: its worker stopped sending heartbeats; failed and queued again", trial.number)


class WarmModelLogging:
    """Optuna callback: once the first trial of this process has ended, MLflow's scan of the installed packages, which
    its first model logging needs, starts beside the trials still training (``Tracker.warm_model_logging``): it is
    then done before the sweep's tail registers the champion. Not at the start: it would slow the first trials'
    preparation in this process."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self._once = threading.Lock()
        self.thread: threading.Thread | None = None

    def __call__(self, _study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        if self._once.acquire(blocking=False):
            self.thread = self.tracker.warm_model_logging()


def champion_run(tracker: Tracker, name: str) -> str | None:
    """The run of the version ``champion`` points to now (another worker or study may have moved it)."""
    mv = tracker.champion(name)
    return mv.run_id if mv is not None else None


class AdapterBudget:
    """Keep the best ``keep`` trials whole, and every Pareto trial and the champion; thin out the rest.

    A finished trial outside them keeps its config, metric stream, logs and ``data.json``, and
    loses its adapter (still in MLflow as an artifact of its run), its ``.pth`` checkpoints (which
    nothing reads once its adapter is saved; gigabytes for a large model) and its copies of the
    training rows where the study's data digest proves ``sweep.data.remake`` gives them back.
    Runs as an Optuna callback, after a trial's result is recorded, and touches COMPLETE and PRUNED
    trials only: a RUNNING trial's files are in use, a FAILED one's are kept to find out why.
    Ranking is by the primary objective, feasible trials first (an ``objective.at_most`` limit or out of memory
    makes one infeasible: it can never become champion, so it never takes the place of one that can). Workers of one study share the work dir, so an adapter
    is removed only under its exclusive lock (a gate registering or scoring it holds it shared,
    and then it stays), and the champion is read after those locks are taken, each time: a gate
    that moved the alias to one of them has finished by then, and the new champion is kept.
    """

    def __init__(self, keep: int, champion_run: Callable[[], str | None] | None = None) -> None:
        self.keep = keep
        self.champion_run = champion_run or (lambda: None)

    def __call__(self, study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        finished = study.get_trials(deepcopy=False, states=states)
        with_adapter = [t for t in finished if _has_adapter(t)]
        sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
        ranked = sorted(with_adapter, key=lambda t: (not feasible(t), t.state != optuna.trial.TrialState.COMPLETE,
                                                     sign * _score(t)))  # fmt: skip
        pareto = {t.number for t in pareto_trials(study)} if len(study.directions) > 1 else set()
        kept = {t.number for t in ranked[: self.keep]} | pareto
        doomed = [t for t in finished if t.number not in kept]
        if not doomed:
            return
        with ExitStack() as locks:
            mine = [t for t in doomed if not _has_adapter(t) or locks.enter_context(adapter_removal(_adapter(t)))]
            for number in sorted({t.number for t in doomed} - {t.number for t in mine}):
                log.info("trial %d: adapter in use by a gate; kept for now (keep_adapters)", number)
            if not mine:
                return
            try:
                champion = self.champion_run()
            except Exception as err:  # noqa: BLE001 - cannot tell which trial is the champion's: remove nothing
                log.warning("keep_adapters: nothing removed this time: %s", err)
                return
            for t in mine:
                if champion is None or t.user_attrs.get("mlflow_run_id") != champion:
                    self._thin_out(t)

    def _thin_out(self, t: optuna.trial.FrozenTrial) -> None:
        """Remove what a trial that is not kept no longer needs; already-thin trials cost a directory scan."""
        import shutil

        adapter = t.user_attrs.get("adapter_path")
        if adapter and Path(adapter).is_dir():
            shutil.rmtree(adapter, ignore_errors=True)
            log.info("trial %d: adapter removed from disk (kept in MLflow); keep_adapters=%d", t.number, self.keep)
        work = Path(t.user_attrs["work_dir"]) if t.user_attrs.get("work_dir") else None
        if work is None or not work.is_dir():
            return
        freed, removed = 0, []
        for ckpt in [*work.rglob("*.pth"), work / "last_checkpoint"]:  # last_checkpoint names the last .pth
            try:
                size = ckpt.stat().st_size
                ckpt.unlink()
            except FileNotFoundError:  # not written, or another thread's callback was first
                continue
            freed += size
            removed.append(ckpt.name)
        removed += data_mod.drop_copies(work)
        if removed:
            log.info("trial %d: removed %s (%.1f MB of checkpoints); not among keep_adapters=%d",
                     t.number, ", ".join(sorted(removed)), freed / 2**20, self.keep)  # fmt: skip


def _adapter(t: optuna.trial.FrozenTrial) -> Path:
    return Path(t.user_attrs["adapter_path"])


def _has_adapter(t: optuna.trial.FrozenTrial) -> bool:
    return bool(t.user_attrs.get("adapter_path")) and _adapter(t).is_dir()


def _score(t: optuna.trial.FrozenTrial) -> float:
    value = t.values[0] if t.values else t.user_attrs.get("best_value")
    return float("inf") if value is None else float(value)
