"""Many workers, clean stops, dead workers: real PostgreSQL and SQLite storages, real `sweep run` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweep.trial import protocol
from tests.conftest import ROOT, inject_into_training, pg_database, write_spec

pytestmark = pytest.mark.e2e
PG = "postgresql://postgres:s3cret-pw@127.0.0.1:5432/{db}"  # trust auth: any password is accepted
FAST = {
    "fixed": "fixed: {max_length: 64, max_epochs: 1, batch_size: 4, accumulative_counts: 1, lora_r: 8}",
    "search_space": "search_space:\n  lr: {type: float, low: 1.0e-3, high: 2.0e-2, log: true}",
    "pruner": "pruner: {type: none}",
    "registry": "",  # no test here reads the registry: no test gate after the trials
}


LONG = {**FAST, "fixed": "fixed: {max_length: 64, max_epochs: 8, batch_size: 2, accumulative_counts: 1, lora_r: 8}"}


def _sweep(cwd: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "sweep.cli", "run", *args], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen,
    )  # fmt: skip


def _wait_for_training(stream: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stream.exists() and '"kind": "train"' in stream.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"training never started ({stream})")


def _training_worker(tmp_path: Path, tiny_model: Path, study: str, *extra: str):
    """A `sweep run` of one long trial on SQLite stores, returned once its trial is training."""
    spec = write_spec(tmp_path, tiny_model, study=f"study: {study}", **LONG)
    storage, tracking = f"sqlite:///{tmp_path / 's.db'}", f"sqlite:///{tmp_path / 'm.db'}"
    args = [str(spec), "--storage", storage, "--tracking-uri", tracking, "--n-trials", "1", *extra]
    worker = _sweep(tmp_path, *args)
    _wait_for_training(tmp_path / "sweep-runs" / study / "trial_0000" / "sweep_metrics.jsonl")
    return worker, args, storage, tracking


def _training_processes(cwd: Path) -> list[int]:
    """Training processes (fresh or resident workers, the fork server and its forks, which keep its command line)
    started by a `sweep run` that ran in ``cwd``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
                where = (proc / "cwd").resolve()
            except OSError:
                continue
            modules = (protocol.WORKER_MODULE.encode(), protocol.FORKSERVER_MODULE.encode())
            if any(module in cmd for module in modules) and where == cwd.resolve():
                pids.append(int(proc.name))
    return pids


def test_two_workers_share_one_postgres_study(tmp_path, tiny_model):
    storage = PG.format(db=pg_database())
    tracking = PG.format(db=pg_database())
    spec = write_spec(tmp_path, tiny_model, study="study: pg-two", **FAST)
    args = [str(spec), "--storage", storage, "--tracking-uri", tracking, "--n-trials", "3"]
    workers = [_sweep(tmp_path, *args) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [out[-3000:] for out in outputs]
    for out in outputs:
        assert "s3cret-pw" not in out, "a password reached the output"

    study = optuna.load_study(study_name="pg-two", storage=storage)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == 6 and sorted(numbers) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("pg-two")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("xtuner_sweep.role") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    by_trial = sorted(int(r.data.tags["xtuner_sweep.trial"]) for r in children)
    assert by_trial == list(range(6)), "every trial has exactly one MLflow child run"
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in children}
    # the data split was made once and used by both workers
    manifest = json.loads((tmp_path / "sweep-runs" / "pg-two" / "data" / "manifest.json").read_text())
    assert study.user_attrs["data_digest"] == manifest["digest"]
    assert {r.data.params["data_digest"] for r in children} == {manifest["digest"]}
    # no password in anything MLflow shows
    for run in runs:
        shown = json.dumps([run.data.params, run.data.tags])
        assert "s3cret-pw" not in shown
    assert "***" in parents[0].data.tags["optuna_storage"]


def test_sigint_stops_running_trial_and_next_run_resumes(tmp_path, tiny_model):
    worker, args, storage, tracking = _training_worker(tmp_path, tiny_model, "stop")
    assert _training_processes(tmp_path), "no training process found to watch"
    worker.send_signal(signal.SIGINT)
    out = worker.communicate(timeout=300)[0]
    assert worker.returncode == 130, out
    assert "run the same command again to resume" in out
    assert not _training_processes(tmp_path), "the training process outlived the stop"

    study = optuna.load_study(study_name="stop", storage=storage)
    first = study.trials[0]
    assert first.state == TrialState.FAIL
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].system_attrs["fixed_params"] == first.params
    client = MlflowClient(tracking_uri=tracking)
    assert client.get_run(first.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    parent = client.search_runs(
        [client.get_experiment_by_name("stop").experiment_id], "tags.`xtuner_sweep.role` = 'study'"
    )
    assert parent[0].info.status == "KILLED"

    fixed = {
        **FAST,
        "fixed": "fixed: {max_length: 64, max_epochs: 1, batch_size: 2, accumulative_counts: 1, lora_r: 8}",
    }
    write_spec(tmp_path, tiny_model, study="study: stop", **fixed)
    again = _sweep(tmp_path, *args)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    study = optuna.load_study(study_name="stop", storage=storage)
    resumed = study.trials[1]
    assert resumed.state == TrialState.COMPLETE and resumed.params == first.params
    assert resumed.user_attrs["resumes_trial"] == 0


def test_killed_worker_trial_is_failed_and_retried(tmp_path, tiny_model):
    worker, args, storage, tracking = _training_worker(tmp_path, tiny_model, "kill", "--heartbeat", "2")
    assert _training_processes(tmp_path), "no training process found to watch"
    worker.send_signal(signal.SIGKILL)
    worker.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while _training_processes(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _training_processes(tmp_path), "training outlived its SIGKILLed worker"
    study = optuna.load_study(study_name="kill", storage=storage)
    assert study.trials[0].state == TrialState.RUNNING
    run_id = study.trials[0].user_attrs["mlflow_run_id"]
    time.sleep(5)  # past the grace period (2 x heartbeat)

    write_spec(tmp_path, tiny_model, study="study: kill", **FAST)  # the retry may train briefly
    later = _sweep(tmp_path, *args)
    out = later.communicate(timeout=300)[0]
    assert later.returncode == 0, out
    study = optuna.load_study(study_name="kill", storage=storage)
    assert study.trials[0].state == TrialState.FAIL
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback
    retried = [t for t in study.trials if retry.retried_trial_number(t) == 0]
    assert retried and retried[0].params == study.trials[0].params
    assert retried[0].state == TrialState.COMPLETE
    assert MlflowClient(tracking_uri=tracking).get_run(run_id).info.status == "KILLED"


OOM_HOOK = """\
import sys
if any("trial_0000" in a for a in argv):  # what a CUDA OOM in training prints, without needing a GPU
    print("Traceback (most recent call last):", file=sys.stderr)
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
    raise SystemExit(1)
"""


def _beside_checkout(inject: Path) -> str:
    """The injected ``sitecustomize`` first, then this checkout: training must import the code under test, not a
    copy the virtual environment may have installed from another checkout (a worktree sharing one venv)."""
    return f"{inject}{os.pathsep}{ROOT}"


def test_out_of_memory_trial_is_infeasible_and_the_sweep_goes_on(tmp_path, tiny_model, monkeypatch):
    from sweep import study as study_mod
    from sweep.spec import load_spec

    inject = inject_into_training(tmp_path / "inject", OOM_HOOK)
    monkeypatch.setenv("PYTHONPATH", _beside_checkout(inject))
    spec = load_spec(write_spec(tmp_path, tiny_model, study="study: oom", n_trials="n_trials: 2", **FAST))
    opts = study_mod.RunOptions(
        storage=f"sqlite:///{tmp_path / 's.db'}",
        tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
        work_dir=tmp_path / "runs",
    )
    report = study_mod.run(spec, opts)
    study = optuna.load_study(study_name="oom", storage=opts.storage)
    oom, ok = study.trials
    assert oom.user_attrs["reason"] == "oom"
    assert oom.state == TrialState.COMPLETE and oom.constraints == {"oom": 1.0}, "infeasible, so the sampler avoids it"
    assert ok.state == TrialState.COMPLETE and ok.constraints == {"oom": 0.0}
    assert study.best_trial.number == 1 and report["best"]["number"] == 1
    tags = MlflowClient(tracking_uri=opts.tracking_uri).get_run(oom.user_attrs["mlflow_run_id"]).data.tags
    assert tags["reason"] == "oom"


NAN_HOOK = """\
import json, pathlib
stream = pathlib.Path(argv[0]).parent / "sweep_metrics.jsonl"  # what a trial whose loss overflowed reports
events = [{"kind": "start", "final_step": 64}] + [
    {"kind": "val", "step": step, "val/loss": float("nan")} for step in (0, 32, 64)
] + [{"kind": "end", "step": 64}]
stream.write_text("".join(json.dumps(e) + "\\n" for e in events))
return
"""


def test_a_trial_whose_every_value_is_nan_fails_saying_so(tmp_path, tiny_model, monkeypatch):
    from sweep import study as study_mod
    from sweep.spec import load_spec

    monkeypatch.setenv("PYTHONPATH", _beside_checkout(inject_into_training(tmp_path / "inject", NAN_HOOK)))
    spec = load_spec(write_spec(tmp_path, tiny_model, study="study: nan", n_trials="n_trials: 1", **FAST))
    opts = study_mod.RunOptions(
        storage=f"sqlite:///{tmp_path / 's.db'}",
        tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
        work_dir=tmp_path / "runs",
    )
    study_mod.run(spec, opts)
    (trial,) = optuna.load_study(study_name="nan", storage=opts.storage).trials
    assert trial.state == TrialState.FAIL
    assert "every val/loss value was NaN" in trial.user_attrs["error"], trial.user_attrs.get("error")
    tags = MlflowClient(tracking_uri=opts.tracking_uri).get_run(trial.user_attrs["mlflow_run_id"]).data.tags
    assert "every val/loss value was NaN" in tags["error"] and tags["state"] == "FAIL"


def test_two_jobs_in_one_worker(tmp_path, tiny_model):
    """--n-jobs 2: two trials train at once in one `sweep run`, each in its own process and MLflow run."""
    from sweep import study as study_mod
    from sweep.spec import load_spec

    spec = load_spec(write_spec(tmp_path, tiny_model, study="study: jobs", n_trials="n_trials: 2", **FAST))
    opts = study_mod.RunOptions(
        storage=f"sqlite:///{tmp_path / 's.db'}",
        tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
        work_dir=tmp_path / "runs",
        n_jobs=2,
    )
    study_mod.run(spec, opts)
    study = optuna.load_study(study_name="jobs", storage=opts.storage)
    errors = {t.number: t.user_attrs.get("error", "")[-600:] for t in study.trials}
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2, errors
    assert not any(t.user_attrs.get("reason") for t in study.trials), errors
    first, second = sorted(study.trials, key=lambda t: t.datetime_start)
    assert second.datetime_start < first.datetime_complete, "the two trials did not overlap"
    runs = {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert len(runs) == 2


OOM_ONCE_HOOK = """\
import os, sys
marker = os.environ["OOM_ONCE_MARKER"]
if not os.path.exists(marker):  # the first training job runs out of memory, later ones train
    open(marker, "w").close()
    print("Traceback (most recent call last):", file=sys.stderr)
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
    raise SystemExit(1)
"""


def _slot_study(tmp_path: Path, tiny_model: Path, name: str):
    """A one-trial study of the tiny model, for ``run_trial`` on fake GPU slots: returns a maker of its
    StudyContext for given slots and memory model."""
    from sweep import data as data_mod
    from sweep import study as study_mod
    from sweep.registry.tracking import Tracker
    from sweep.spec import load_spec
    from sweep.trial.run import StudyContext
    from sweep.xtuner.render import Device

    spec = load_spec(write_spec(tmp_path, tiny_model, study=f"study: {name}", n_trials="n_trials: 1", **FAST))
    checked = study_mod.check(spec)
    root = tmp_path / "runs" / name
    prepared = data_mod.prepare(spec.data, root / "data")
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}")
    experiment = tracker.experiment(name)
    parent = tracker.parent_run(experiment, name, {}, "")

    def context(slots, memory) -> StudyContext:
        return StudyContext(spec, checked.base_cfg, checked.base_knobs, prepared, root, Device(cuda=False), tracker,
                            experiment, parent, threads=2, slots=slots, memory=memory)  # fmt: skip

    return context


def test_out_of_memory_beside_another_trial_runs_again_alone(tmp_path, tiny_model, monkeypatch):
    """GPU slots with a fake device list: a trial that OOMs while sharing its GPU is retried alone, not lost."""
    import threading

    from sweep.trial.placement import GpuSlots, MemoryModel, ModelShape
    from sweep.trial.run import run_trial

    inject = inject_into_training(tmp_path / "inject", OOM_ONCE_HOOK)
    monkeypatch.setenv("PYTHONPATH", _beside_checkout(inject))
    monkeypatch.setenv("OOM_ONCE_MARKER", str(tmp_path / "oomed"))
    context = _slot_study(tmp_path, tiny_model, "share")
    memory = MemoryModel(ModelShape.from_dir(tiny_model))
    floors_at_release: list[float] = []

    class Slots(GpuSlots):
        def release(self, gpus: list[int], need_mb: float) -> None:
            if need_mb != 1_000.0:  # our trial's slot, not the neighbour's
                floors_at_release.append(memory.floor)
            super().release(gpus, need_mb)

    slots = Slots({0: 80_000.0})
    neighbour = slots.acquire(1_000.0)  # another trial is on GPU 0 when ours starts

    def neighbour_leaves() -> None:  # after our trial's first attempt ran out of memory beside it
        while not (tmp_path / "oomed").exists():
            time.sleep(0.2)
        time.sleep(1.0)
        slots.release(neighbour, 1_000.0)

    threading.Thread(target=neighbour_leaves, daemon=True).start()
    ctx = context(slots, memory)
    study = optuna.create_study(study_name="share", storage=f"sqlite:///{tmp_path / 's.db'}")
    before = memory.calibration

    study.optimize(lambda t: run_trial(t, ctx), n_trials=1)

    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE and trial.constraints == {"oom": 0.0}, "retried, not infeasible"
    assert (tmp_path / "oomed").exists(), "the first attempt really ran out of memory"
    work = Path(trial.user_attrs["work_dir"])
    assert "CUDA out of memory" in (work / "train.oom.log").read_text()
    assert trial.user_attrs["gpus"] == [0] and trial.user_attrs["best_step"] > 0
    assert memory.calibration == memory.floor == 1.25 * before, "later trials are planned larger, for good"
    assert floors_at_release == [memory.floor] * 2, "learnt before the first slot freed: its waiters are placed by it"
    assert slots.count == {0: 0}, "every slot given back"
    tags = MlflowClient(tracking_uri=ctx.tracker.uri).get_run(trial.user_attrs["mlflow_run_id"]).data.tags
    assert tags["retried_after_oom"] == "shared GPU" and tags["state"] == "COMPLETE"


RESERVE_HOOK = """\
import dataclasses
import sweep.training.hook as hook
from sweep.trial import protocol

_emit = hook.SweepHook._emit


def emit(self, event):  # what a GPU would report: a reserve of 4,000 MB from the first iteration on, 4,321 at the end
    if isinstance(event, protocol.Train):
        event = protocol.Train(event.iter, event.step, {**event.metrics, protocol.RESERVED_KEY: 4_000.0})
    elif isinstance(event, protocol.End):
        event = dataclasses.replace(event, peak_memory_mb=4_321.0)
    _emit(self, event)


hook.SweepHook._emit = emit
"""


def test_a_trial_slot_fits_its_measured_peak_after_its_first_iterations(tmp_path, tiny_model, monkeypatch):
    """A trial's first memory guess is a formula (on an H100 it planned a batch-4 trial at 50.7 GB that used 30 GB,
    docs/benchmarks.md): after its first iterations the trial's slot shrinks to the reserve it reports, so a trial
    waiting for that memory starts beside it instead of after it, and the memory model learns the peak then."""
    import threading

    from sweep.trial.placement import CONTEXT_MB, FITTED_MARGIN, GpuSlots, MemoryModel, ModelShape
    from sweep.trial.run import run_trial

    monkeypatch.setenv("PYTHONPATH", _beside_checkout(inject_into_training(tmp_path / "inject", RESERVE_HOOK)))
    context = _slot_study(tmp_path, tiny_model, "fit")
    memory = MemoryModel(ModelShape.from_dir(tiny_model))
    fitted = CONTEXT_MB + 4_000.0 * FITTED_MARGIN
    events: list[tuple[str, float, list]] = []

    class Slots(GpuSlots):
        def resize(self, gpus: list[int], from_mb: float, to_mb: float) -> None:
            events.append(("resize", to_mb, list(memory.measured)))
            super().resize(gpus, from_mb, to_mb)

        def release(self, gpus: list[int], need_mb: float) -> None:
            events.append(("release", need_mb, list(memory.measured)))
            super().release(gpus, need_mb)

    slots = Slots({0: 80_000.0})
    ours = 50_000.0  # the formula's guess for our trial, as a fresh sweep's first trials get
    monkeypatch.setattr(MemoryModel, "estimate", lambda self, *args, **kwargs: ours)
    waiter = threading.Thread(target=lambda: events.append(("waiter placed", slots.acquire(30_000.0)[0], [])))

    fits_beside_first_guess: list[bool] = []

    def start_waiter_once_ours_holds_its_slot() -> None:
        while slots.count[0] == 0:
            time.sleep(0.05)
        fits_beside_first_guess.append(slots.used[0] + 30_000.0 <= 80_000.0 * 0.92)
        waiter.start()

    threading.Thread(target=start_waiter_once_ours_holds_its_slot, daemon=True).start()
    study = optuna.create_study(study_name="fit", storage=f"sqlite:///{tmp_path / 's.db'}")

    study.optimize(lambda t: run_trial(t, context(slots, memory)), n_trials=1)
    if waiter.ident is not None:
        waiter.join(timeout=30)

    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE
    assert fits_beside_first_guess == [False], "the waiter did not fit beside our trial's first guess"
    kinds = [kind for kind, _, _ in events]
    assert kinds == ["resize", "waiter placed", "release"], f"placed beside our trial, before it ended: {events}"
    assert events[0][1] == fitted and [p for _, p in events[0][2]] == [4_000.0], "learnt after the first iterations"
    assert events[2][1] == fitted, "the release gives back what the slot holds now, not the first guess"
    assert [p for _, p in memory.measured] == [4_321.0], "the end's peak replaces the trial's early one"
    assert slots.used == {0: 30_000.0} and slots.count == {0: 1}, "only the waiter holds memory now"
    stream = Path(trial.user_attrs["work_dir"]) / "sweep_metrics.jsonl"
    trains = [json.loads(line) for line in stream.read_text().splitlines() if '"train"' in line]
    assert len(trains) > protocol.PEAK_AFTER_ITERS, "the trial went on training after its slot shrank"


PEAK_HOOK = """\
import dataclasses
import sweep.training.hook as hook
from sweep.trial import protocol

_emit = hook.SweepHook._emit


def emit(self, event):  # the End event a GPU would send: this job's allocator peak
    if isinstance(event, protocol.End):
        event = dataclasses.replace(event, peak_memory_mb=4_321.0)
    _emit(self, event)


hook.SweepHook._emit = emit
"""


def test_a_finished_trial_teaches_its_peak_before_its_slot_frees(tmp_path, tiny_model, monkeypatch):
    """The trials waiting for a slot are placed when it frees: by then the memory model must know the peak of the
    trial that freed it, or they are placed by the guess they began waiting with (docs/benchmarks.md, 2026-12-07)."""
    from sweep.trial.placement import GpuSlots, MemoryModel, ModelShape
    from sweep.trial.run import run_trial

    monkeypatch.setenv("PYTHONPATH", _beside_checkout(inject_into_training(tmp_path / "inject", PEAK_HOOK)))
    context = _slot_study(tmp_path, tiny_model, "peak")
    memory = MemoryModel(ModelShape.from_dir(tiny_model))
    seen_at_release: list[list[tuple[float, float]]] = []

    class Slots(GpuSlots):
        def release(self, gpus: list[int], need_mb: float) -> None:
            seen_at_release.append(list(memory.measured))
            super().release(gpus, need_mb)

    slots = Slots({0: 80_000.0})
    ctx = context(slots, memory)
    study = optuna.create_study(study_name="peak", storage=f"sqlite:///{tmp_path / 's.db'}")

    study.optimize(lambda t: run_trial(t, ctx), n_trials=1)

    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["peak_memory_mb"] == 4_321
    assert len(seen_at_release) == 1 and [p for _, p in seen_at_release[0]] == [4_321.0], seen_at_release
    assert memory.measured == seen_at_release[0], "observed once, not again when the trial is recorded"
    assert slots.count == {0: 0} and slots.used == {0: 0.0}
