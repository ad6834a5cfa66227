"""What a running sweep shows: a live view in a terminal, plain log lines everywhere else.

In a terminal, each running trial gets a bar of training samples seen out of its total, its
latest validation value with its standard error, its fit so far (``sweep.fit``) and an ETA, under a line with the study's counts and best trial so far;
log lines scroll above it. When output goes to a file or CI, the same facts come as one log line
per validation point, which greps and tails well.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import optuna
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.text import Text

from sweep.ranking import best_trial

log = logging.getLogger("sweep")


class SweepProgress:
    """Fed by the trials (thread-safe: trials of ``--n-jobs`` report from their own threads)."""

    def __init__(self, n_trials: int, metric: str, console: Console | None = None, live: bool | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal if live is None else live
        self.n_trials = n_trials
        self.metric = metric
        self.counts: Counter[str] = Counter()
        self.best = ""
        self._lock = threading.Lock()
        self._tasks: dict[int, TaskID] = {}
        self._started: dict[int, float] = {}
        self._bars = Progress(
            TextColumn("trial {task.fields[number]:>3}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("samples  {task.fields[latest]}"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._view: Live | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> SweepProgress:
        if self.live:
            self._view = Live(Group(self._bars, _Summary(self)), console=self.console, refresh_per_second=4)
            self._view.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._view is not None:
            self._view.__exit__(*exc)
            self._view = None

    def summary(self) -> str:
        c = self.counts
        done = sum(c.values())
        running = len(self._tasks)
        text = (
            f"{done}/{self.n_trials} trials done: {c['COMPLETE']} complete, {c['PRUNED']} pruned, "
            f"{c['FAIL']} failed; {running} running"
        )
        return text + (f" | best {self.best}" if self.best else "")

    # -- events from a trial ------------------------------------------------------------------
    def trial_started(self, number: int) -> None:
        with self._lock:
            self._started[number] = time.monotonic()
            self._tasks[number] = self._bars.add_task("", total=None, number=number, latest="", visible=self.live)

    def trial_planned(self, number: int, final_step: int) -> None:
        if number in self._tasks:
            self._bars.update(self._tasks[number], total=final_step)

    def trial_step(self, number: int, step: int) -> None:
        if number in self._tasks:
            self._bars.update(self._tasks[number], completed=step)

    def trial_value(self, number: int, step: int, value: float, final_step: int | None, pruned: bool,
                    se: float = float("nan"), fit: str = "") -> None:  # fmt: skip
        """One validation point: its value (± its standard error when known) and the trial's fit so far."""
        noise = f" ±{se:.4f}" if se == se else ""
        fitted = f" ({fit})" if fit else ""
        latest = f"{self.metric} {value:.4f}{noise} @ {step}{fitted}" + (" pruned" if pruned else "")
        if number in self._tasks:
            self._bars.update(self._tasks[number], completed=step, latest=latest)
        if not self.live:
            log.info("trial %d: step %s %s=%.4f%s%s%s%s", number, _of(step, final_step), self.metric, value, noise,
                     fitted, self._eta(number, step, final_step), " -> pruned" if pruned else "")  # fmt: skip

    def _eta(self, number: int, step: int, final_step: int | None) -> str:
        started = self._started.get(number)
        if not started or not final_step or step <= 0 or step >= final_step:
            return ""
        seconds = (time.monotonic() - started) * (final_step - step) / step
        return f", ETA {seconds:.0f}s"

    def trial_ended(self, number: int) -> None:
        with self._lock:
            task = self._tasks.pop(number, None)
            if task is not None:
                self._bars.remove_task(task)

    # -- Optuna callback: after each trial is recorded ----------------------------------------
    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.trial_ended(trial.number)
        with self._lock:
            self.counts[trial.state.name] += 1
            if trial.state == optuna.trial.TrialState.COMPLETE and trial.values:
                best = best_trial(study)
                if best is not None:
                    self.best = f"trial {best.number}: {self.metric} {best.values[0]:.4f}"
        if not self.live:
            log.info("study: %s", self.summary())


def _of(step: int, final_step: int | None) -> str:
    if not final_step:
        return str(step)
    return f"{step}/{final_step} ({100 * step / final_step:.0f}%)"


class _Summary:
    def __init__(self, progress: SweepProgress) -> None:
        self.progress = progress

    def __rich__(self) -> Text:
        return Text(self.progress.summary(), style="bold")
