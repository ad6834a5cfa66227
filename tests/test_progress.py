"""The live view in a terminal and the plain lines elsewhere, fed the events a trial sends."""

from __future__ import annotations

import io
import logging

import optuna
from rich.console import Console

from sweep.progress import SweepProgress


def _study_with(values: list[float | None]) -> optuna.Study:
    study = optuna.create_study(direction="minimize")  # in memory: the callback reads a real study
    for v in values:
        t = study.ask()
        study.tell(t, v, state=optuna.trial.TrialState.PRUNED if v is None else None)
    return study


def test_terminal_shows_running_trials_counts_and_best():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140, color_system=None)
    progress = SweepProgress(4, "val/loss", console=console)
    assert progress.live
    study = _study_with([2.5, None])
    with progress:
        for t in study.trials:
            progress(study, t)
        progress.trial_started(2)
        progress.trial_planned(2, 200)
        progress.trial_step(2, 40)
        progress.trial_value(2, 64, 1.2345, 200, pruned=False)
        progress._view.refresh()
        text = out.getvalue()
        assert "trial   2" in text and "64/200" in text and "val/loss 1.2345 @ 64" in text
        assert "2/4 trials done: 1 complete, 1 pruned, 0 failed; 1 running" in text
        assert "best trial 0: val/loss 2.5000" in text
        before = len(out.getvalue())
        progress.trial_ended(2)
        progress._view.refresh()
    assert "; 0 running" in out.getvalue()[before:], "a finished trial leaves the view"


def test_plain_lines_when_not_a_terminal(caplog):
    progress = SweepProgress(3, "val/rouge_l", console=Console(file=io.StringIO()))
    assert not progress.live
    with caplog.at_level(logging.INFO, logger="sweep"), progress:
        progress.trial_started(0)
        progress.trial_value(0, 64, 0.42, 256, pruned=False)
        progress.trial_value(0, 128, 0.40, 256, pruned=True)
        study = _study_with([0.42])
        progress(study, study.trials[0])
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("trial 0: step 64/256 (25%) val/rouge_l=0.4200, ETA") for line in lines), lines
    assert any(line.endswith("-> pruned") and "128/256 (50%)" in line for line in lines), lines
    assert (
        "study: 1/3 trials done: 1 complete, 0 pruned, 0 failed; 0 running | best trial 0: val/rouge_l 0.4200" in lines
    )


def test_each_point_shows_its_noise_and_the_fit_so_far(caplog):
    out = io.StringIO()
    live = SweepProgress(2, "val/loss", console=Console(file=out, force_terminal=True, width=160, color_system=None))
    with live:
        live.trial_started(1)
        live.trial_value(1, 96, 2.5, 256, pruned=False, se=0.0812, fit="under-fitted")
        live._view.refresh()
        assert "val/loss 2.5000 ±0.0812 @ 96 (under-fitted)" in out.getvalue()
    plain = SweepProgress(2, "val/loss", console=Console(file=io.StringIO()))
    with caplog.at_level(logging.INFO, logger="sweep"), plain:
        plain.trial_started(0)
        plain.trial_value(0, 128, 2.6, 256, pruned=False, se=0.05, fit="over-fitted since step 128")
        plain.trial_value(0, 160, 2.7, 256, pruned=False)  # no error known, no verdict yet: nothing added
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("trial 0: step 128/256 (50%) val/loss=2.6000 ±0.0500 (over-fitted since step 128)")
               for line in lines), lines  # fmt: skip
    assert any(line.startswith("trial 0: step 160/256 (62%) val/loss=2.7000, ETA") for line in lines), lines
