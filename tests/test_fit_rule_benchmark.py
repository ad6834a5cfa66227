"""The keep-rule benchmark's summary counts what it says: kept no worse than last, and the champion's gap."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("fit_rule", ROOT / "benchmarks" / "fit_rule.py")
fit_rule = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fit_rule)


def _trial(number: int, state: str, kept: dict[str, tuple[int, float]], test_loss: dict[int, float]) -> dict:
    return {"number": number, "state": state, "last_step": max(test_loss),
            "kept": {r: {"step": s, "value": v, "se": 0.1} for r, (s, v) in kept.items()},
            "test_loss": {str(s): v for s, v in test_loss.items()}}  # fmt: skip


def test_summary_counts_kept_against_last_and_the_champions_gap():
    same = {"better_beyond_noise": (32, 5.0)}
    results = {
        0: [
            # best keeps 64 (test 3.0, worse than the last's 2.8); latest_within_noise keeps the last one
            _trial(0, "COMPLETE", {"best": (64, 4.0), "latest_within_noise": (96, 4.1), **same},
                   {32: 3.5, 64: 3.0, 96: 2.8}),
            # the champion by validation under both rules, but the lower test/loss belongs to trial 0
            _trial(1, "COMPLETE", {"best": (32, 3.9), "latest_within_noise": (32, 3.9), **same}, {32: 3.2, 64: 3.3}),
            _trial(2, "PRUNED", {"best": (32, 3.0), "latest_within_noise": (32, 3.0), **same}, {32: 3.4}),
        ]
    }  # fmt: skip
    lines = dict(line.strip().split(": ", 1) for line in fit_rule.summarize(results))
    assert lines["best"].startswith("kept no worse than last on test/loss in 2/3 trials (mean kept test/loss 3.2000)")
    assert lines["latest_within_noise"].startswith("kept no worse than last on test/loss in 3/3 trials")
    assert "champion's test/loss 3.2000 (mean 3.2000), above the best trial's by 0.2000" in lines["best"]
    assert "above the best trial's by 0.0000" not in lines["latest_within_noise"]  # 3.2 vs 2.8: still trial 1
    assert "above the best trial's by 0.4000" in lines["latest_within_noise"]
    with pytest.raises(KeyError):  # a rule without a kept point cannot be counted silently
        fit_rule.summarize({0: [_trial(0, "COMPLETE", {"best": (32, 1.0)}, {32: 1.0})]})
