"""The throughput benchmark's report prints a speed-up only when every trial of both sides finished.

At be84680 it printed a speed-up over 12 sweep trials that had all crashed before their first step (each
had a metric stream holding only its start event).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "throughput.py"
_spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
throughput = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(throughput)
ORDER, TRIALS = throughput.ORDER, throughput.TRIALS


def _results(out, sweep_failed: set[int] = frozenset(), stock_failed: set[int] = frozenset()) -> None:
    stock = {
        str(i): {"bs": TRIALS[i][0], "r": TRIALS[i][1], "rc": 1 if i in stock_failed else 0, "wall": 30.0,
                 "train_seconds": 10.0, "iters": 3 if i in stock_failed else 20, "steady_iter_seconds": 0.5,
                 "last_loss": 9.0, "peak_mb": 1000, **({"failed": True} if i in stock_failed else {})}
        for i in ORDER
    }  # fmt: skip
    trials = {}
    for i in ORDER:
        if i in sweep_failed:
            trials[str(i)] = {"bs": TRIALS[i][0], "r": TRIALS[i][1], "failed": True, "state": "FAIL",
                              "error": "RuntimeError: mat1 and mat2 must have the same dtype"}  # fmt: skip
        else:
            trials[str(i)] = {"bs": TRIALS[i][0], "r": TRIALS[i][1], "iters": 20, "train_seconds": 8.0,
                              "tokens": 40960.0, "steady_iter_seconds": 0.4, "last_loss": 9.0, "peak_mb": 900,
                              "wall": 12.0, "worker": {"job": 1}}  # fmt: skip
    (out / "stock.json").write_text(json.dumps(stock))
    (out / "sweep.json").write_text(json.dumps({"rc": 0, "wall": 150.0, "trials": trials}))


def _report(out) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "BENCH_WORK": str(out)}
    return subprocess.run([sys.executable, str(SCRIPT), "report"], env=env, capture_output=True, text=True)


def test_all_trials_finished_prints_the_speed_up(tmp_path):
    _results(tmp_path)
    done = _report(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "speed-up (a)/(b): 2.40x" in done.stdout  # 12 x 30 s against 150 s


def test_a_failed_sweep_trial_prints_no_speed_up_and_fails(tmp_path):
    _results(tmp_path, sweep_failed={3, 9})
    done = _report(tmp_path)
    assert done.returncode == 1
    assert "speed-up" not in done.stdout and "tokens/s" not in done.stdout
    assert "(b) sweep trial 3: FAIL" in done.stdout and "mat1 and mat2" in done.stdout
    assert "(b) sweep trial 9" in done.stdout


def test_a_failed_stock_trial_prints_no_speed_up_and_fails(tmp_path):
    _results(tmp_path, stock_failed={0})
    done = _report(tmp_path)
    assert done.returncode == 1 and "speed-up" not in done.stdout
    assert "(a) stock trial 0: exit code 1, 3 of 20 iterations" in done.stdout


def test_a_missing_side_prints_no_speed_up(tmp_path):
    _results(tmp_path)
    (tmp_path / "sweep.json").unlink()
    done = _report(tmp_path)
    assert done.returncode == 1 and "speed-up" not in done.stdout
    assert "(b) sweep: trials" in done.stdout and "have no result" in done.stdout
