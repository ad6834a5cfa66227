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

import pytest

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


def test_a_failed_warm_up_prints_no_speed_up_and_a_warmed_run_says_so(tmp_path):
    _results(tmp_path)
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    (tmp_path / "sweep.json").write_text(json.dumps(sweep | {"warmed": {"rc": 0, "wall": 40.0}}))
    done = _report(tmp_path)
    assert done.returncode == 0 and "speed-up (a)/(b)" in done.stdout
    assert "machine: warmed first by a 1-trial, 2-iteration sweep" in done.stdout
    (tmp_path / "sweep.json").write_text(json.dumps(sweep | {"warmed": {"rc": 1, "wall": 3.0}}))
    done = _report(tmp_path)
    assert done.returncode == 1 and "speed-up" not in done.stdout
    assert "its warm-up sweep exited with code 1" in done.stdout


def test_a_failed_stock_trial_prints_no_speed_up_and_fails(tmp_path):
    _results(tmp_path, stock_failed={0})
    done = _report(tmp_path)
    assert done.returncode == 1 and "speed-up" not in done.stdout
    assert "(a) stock trial 0: exit code 1, 3 of 20 iterations" in done.stdout


def test_the_stock_side_alone_prints_its_wall_time_but_no_speed_up(tmp_path):
    """A device call that ran only (a) (`STEPS=stock`) prints (a)'s total; a missing (a) trial prints nothing."""
    _results(tmp_path)
    (tmp_path / "sweep.json").unlink()
    done = _report(tmp_path)
    assert done.returncode == 0, done.stdout
    assert "(a) stock, one after another: 12 trials, wall 360s" in done.stdout  # 12 x 30 s
    assert "(b) sweep has no results here" in done.stdout and "speed-up (a)/(b)" not in done.stdout
    stock = json.loads((tmp_path / "stock.json").read_text())
    del stock["5"]
    (tmp_path / "stock.json").write_text(json.dumps(stock))
    done = _report(tmp_path)
    assert done.returncode == 1 and "wall 360s" not in done.stdout and "speed-up (a)/(b)" not in done.stdout
    assert "(a) stock: trials 5 have no result" in done.stdout


def test_the_sweep_side_alone_prints_its_wall_time_but_no_speed_up(tmp_path):
    """A device call that ran only (b) (`STEPS=sweep`) must still print (b)'s wall time and aggregate figures."""
    _results(tmp_path)
    (tmp_path / "stock.json").unlink()
    done = _report(tmp_path)
    assert done.returncode == 0, done.stdout
    assert "(b) sweep: 12 trials, wall 150s" in done.stdout and "speed-up (a)/(b)" not in done.stdout
    assert "(a) stock has no results here" in done.stdout
    _results(tmp_path, sweep_failed={3})
    (tmp_path / "stock.json").unlink()
    done = _report(tmp_path)
    assert done.returncode == 1 and "wall 150s" not in done.stdout, "a failed (b) trial still prints nothing"


def test_the_report_puts_each_trials_losses_side_by_side(tmp_path):
    _results(tmp_path)
    stock, sweep = json.loads((tmp_path / "stock.json").read_text()), json.loads((tmp_path / "sweep.json").read_text())
    for i in ORDER:
        stock[str(i)].update(losses=[9.0 - 0.1 * k for k in range(20)], rows_sha256="abc")
        sweep["trials"][str(i)].update(losses=[9.0 - 0.1 * k for k in range(20)], rows_sha256="abc")
    stock["11"]["losses"][4] = 8.6 * 1.001  # step 5 of trial 11 off by 1e-3
    (tmp_path / "stock.json").write_text(json.dumps(stock))
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    alone = {"11": {**sweep["trials"]["11"], "rc": 0}}
    (tmp_path / "alone.json").write_text(json.dumps(alone))
    done = _report(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "    (b) sweep  9.0000 8.9000 8.8000" in done.stdout
    assert "(a) stock vs (b): largest relative difference 1.00e-03 (step 5), 20 steps compared, same rows file" in (
        done.stdout
    )
    assert "alone vs (b): largest relative difference 0.00e+00" in done.stdout
    assert "largest relative loss difference (a)-(b), all trials, all steps: 1.00e-03" in done.stdout


def test_a_longer_run_computes_stock_from_the_short_run_and_says_so(tmp_path):
    _results(tmp_path)
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    sweep["iters_asked"] = 300
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    env = {**os.environ, "OUT": str(tmp_path), "BENCH_WORK": str(tmp_path), "BENCH_ITERS": "300"}
    done = subprocess.run([sys.executable, str(SCRIPT), "report"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # each stock trial: 30 s wall - 10 s of steps = 20 s start-up, + 300 steady steps of 0.5 s = 170 s; 12 of them
    assert "COMPUTED from the 20-iteration run (not measured)" in done.stdout and "2040s" in done.stdout
    assert "speed-up (a)/(b): 13.60x" in done.stdout and "(a) computed from the 20-iteration run" in done.stdout
    assert "aggregate MFU over the sweep's wall time" in done.stdout


def test_a_cpu_stock_config_trains_in_fp32_on_the_given_rows(tmp_path):
    text = throughput.stock_config(2, 16, tmp_path / "rows.jsonl", cuda=False)
    assert "AmpOptimWrapper" not in text and "type=OptimWrapper" in text and "torch.float32" in text
    assert 'loss_scale="dynamic"' not in text and 'dtype="bfloat16"' not in text
    assert f"data_file = {str(tmp_path / 'rows.jsonl')!r}" in text and "batch_size = 2" in text
    gpu = throughput.stock_config(2, 16, tmp_path / "rows.jsonl", cuda=True)
    assert "type=AmpOptimWrapper" in gpu and 'dtype="bfloat16"' in gpu


def test_the_timeline_splits_the_sweeps_wall_time_around_its_trials():
    """Three trials: two train together from 10 s, the third waits for a slot; the sweep ends 20 s after the last."""
    sweep_r = {"wall": 100.0, "trials": {
        "0": {"asked": 5.0, "slot": 10.0, "exit": 40.0},
        "1": {"asked": 5.5, "slot": 10.5, "exit": 30.0},
        "2": {"asked": 6.0, "slot": 50.0, "exit": 80.0},
        "3": {"failed": True},
    }}  # fmt: skip
    lines = throughput.timeline_lines(sweep_r)
    assert lines[0] == (
        "    timeline: launch to the first trial's slot 10.0s; first slot to the last trial's exit 70.0s "
        "(at least one trial training 60.0s of it, at most 2 at once); after the last exit to the sweep's end 20.0s"
    )
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["trial 0", "trial 1", "trial 2"]
    assert throughput.timeline_lines({"wall": 1.0, "trials": {"0": {"failed": True}}}) == []


def test_a_trials_timeline_is_counted_from_the_launch():
    attrs = {"train_started_at": 1_000_012.0, "train_wall_seconds": 30.0}
    assert throughput.timeline(1_000_000.0, 1_000_004.0, attrs) == {"asked": 4.0, "slot": 12.0, "exit": 42.0}
    assert throughput.timeline(1_000_000.0, None, {}) == {}


def test_a_trials_setup_is_split_by_its_start_events_marks():
    """Slot at 100 s; the worker began the job at 100.5, its runner was built at 103, the loop started at 104."""
    attrs = {"train_started_at": 100.0, "train_wall_seconds": 20.0}
    start = {"time": 104.0, "job_began": 100.5, "runner_built": 103.0}
    end = {"time": 118.0, "val_seconds": 2.0}
    got = throughput.phases(start, end, 11.0, attrs)
    assert got == {"setup": 4.0, "val": 2.0, "loop_rest": 1.0, "teardown": 2.0, "handover": 0.5, "runner": 2.5,
                   "before_train": 1.0}  # fmt: skip
    assert "runner" not in throughput.phases({"time": 104.0}, end, 11.0, attrs)  # a stream from before the marks


def test_the_report_says_whether_the_trials_shared_the_gpu_through_mps(tmp_path):
    """(b)'s speed depends on speed.mps (auto by default): the report says what the sweep's log said of it."""
    log = tmp_path / "sweep.log"
    log.write_text("07:58:29 GPUs [0] (81559 MB)\n07:58:29 MPS: the trials on GPU 0 share it through a server of "
                   "this sweep's own (/tmp/xtuner-sweep-mps-x)\n07:58:29 started 5 training worker(s)\n")  # fmt: skip
    line = throughput._mps_line(log)
    assert line == "MPS: the trials on GPU 0 share it through a server of this sweep's own (/tmp/xtuner-sweep-mps-x)"
    _results(tmp_path)
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    (tmp_path / "sweep.json").write_text(json.dumps({**sweep, "mps": line}))
    assert line in _report(tmp_path).stdout
    _results(tmp_path)  # an older sweep.json, or a log without the line
    assert "MPS: the sweep log says nothing of it" in _report(tmp_path).stdout
    assert throughput._mps_line(tmp_path / "missing.log") is None


def test_the_gpus_tokens_per_second_by_trials_stepping_at_once():
    """Whether more trials at once train more tokens: each step's tokens counted where it ran, by how many ran."""
    launched = 1000.0
    one = [{"kind": "start", "time": 1001.0}, {"kind": "val", "step": 0, "time": 1002.0}]
    one += [{"kind": "train", "perf/iter_seconds": 1.0, "perf/tokens_per_sec": 100.0} for _ in range(4)]  # 2-6 s
    two = [{"kind": "val", "step": 0, "time": 1004.0}]
    two += [{"kind": "train", "perf/iter_seconds": 2.0, "perf/tokens_per_sec": 50.0} for _ in range(2)]  # 4-8 s
    two_late = [{"kind": "val", "step": 0, "time": 1010.0},  # 10-11 s: a gap of 2 s with nothing stepping
                {"kind": "train", "perf/iter_seconds": 1.0, "perf/tokens_per_sec": 80.0}]  # fmt: skip
    steps = [throughput.step_intervals(e, launched) for e in (one, two, two_late)]
    assert steps[0] == [[2.0, 3.0, 100], [3.0, 4.0, 100], [4.0, 5.0, 100], [5.0, 6.0, 100]]
    assert throughput.step_intervals([{"kind": "train", "perf/iter_seconds": 1.0}], launched) == [], "no clock"

    by_k = throughput.stepping(steps)

    assert by_k[1] == (2.0 + 2.0 + 1.0, 200.0 + 100.0 + 80.0)  # 2-4 s one, 6-8 s two, 10-11 s the late one
    assert by_k[2] == (2.0, 200.0 + 100.0)  # 4-6 s: two steps of one and half of each of two's steps
    assert by_k[0] == (2.0, 0.0)
    assert sum(t for _, t in by_k.values()) == 4 * 100 + 2 * 100 + 80, "every token counted once"
    lines = throughput.stepping_lines({"trials": {str(i): {"steps_at": s} for i, s in enumerate(steps)}})
    assert "      2 stepping:    2.0s, 150 tokens/s" in "\n".join(lines)
    # without first steps: one's 3-6 s and two's 6-8 s, never at once; the late trial's only step is a first step
    assert lines[-1] == ("      each trial's first step left out (3 steps, 4.0s in all; with speed.compile the compile "
                         "is in it): 1 at once 80 tokens/s (5s)")  # fmt: skip


def test_a_run_of_part_of_the_trials_compares_with_those_trials_of_stock_only(tmp_path):
    """The 300-iteration variant runs half the trials a call (BENCH_TRIALS) beside a stock.json of all 12."""
    _results(tmp_path)
    half = ORDER[:6]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    sweep |= {"iters_asked": 300, "wall": 500.0, "trials": {str(i): sweep["trials"][str(i)] for i in half}}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    env = {**os.environ, "OUT": str(tmp_path), "BENCH_WORK": str(tmp_path), "BENCH_ITERS": "300",
           "BENCH_TRIALS": ",".join(map(str, half))}  # fmt: skip
    done = subprocess.run([sys.executable, str(SCRIPT), "report"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # six stock trials of 170 s computed (see above) against 500 s
    assert "6 trials, 1020s" in done.stdout and "speed-up (a)/(b): 2.04x" in done.stdout, done.stdout


def test_merged_runs_count_their_steps_one_after_another(tmp_path, monkeypatch):
    """Each part's times count from its own launch; merged, the second part's steps follow the first's wall time,
    so trials of different parts never count as stepping at once. A failed part stays failed."""
    parts = []
    for n, (trial, rc) in enumerate((("11", 0), ("0", -9))):
        folder = tmp_path / f"part{n}"
        folder.mkdir()
        run = {"rc": rc, "wall": 20.0, "failed": [], "iters_asked": 20, "speed": "", "trials_per_worker": 1,
               "trials": {trial: {"bs": 1, "r": 8, "steps_at": [[5.0, 15.0, 1000]]}}}  # fmt: skip
        (folder / "sweep.json").write_text(json.dumps(run))
        parts.append(folder)
    monkeypatch.setattr(throughput, "OUT", tmp_path / "out")

    throughput.merge(parts)

    merged = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert merged["wall"] == 40.0 and merged["parts"] == [20.0, 20.0] and merged["rc"] == -9
    assert merged["trials"]["0"]["steps_at"] == [[25.0, 35.0, 1000]]
    assert throughput.stepping([t["steps_at"] for t in merged["trials"].values()]) == {
        1: (20.0, 2000.0),
        0: (10.0, 0.0),
    }
    again = tmp_path / "again"
    again.mkdir()
    (again / "sweep.json").write_text((parts[0] / "sweep.json").read_text())
    with pytest.raises(SystemExit, match=r"trials \['11'\] are in more than one run"):
        throughput.merge([parts[0], again])


def test_steps_after_a_validation_point_start_from_it():
    events = [{"kind": "val", "time": 10.0}, {"kind": "train", "perf/iter_seconds": 1.0, "perf/tokens_per_sec": 5.0},
              {"kind": "val", "time": 20.0}, {"kind": "train", "perf/iter_seconds": 1.0, "perf/tokens_per_sec": 5.0}]  # fmt: skip
    assert throughput.step_intervals(events, 0.0) == [[10.0, 11.0, 5], [20.0, 21.0, 5]]
