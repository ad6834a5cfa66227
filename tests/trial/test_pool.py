"""Resident workers: a trial trained in a worker that already holds the model equals a fresh process's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweep.training import job
from sweep.training.base_model import CACHE
from sweep.trial import launcher
from sweep.trial.placement import GpuSlots
from sweep.trial.pool import Worker, WorkerPool


def _events(path: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind]


@pytest.mark.e2e
def test_workers_are_reused_and_a_failed_job_ends_its_worker(e2e):
    trials = {t.number: t for t in e2e["study"].trials}
    w = {n: t.user_attrs["worker"] for n, t in trials.items()}
    assert w[0]["job"] == 1 and w[0]["model_reused"] is False, "the first trial loads the model"
    assert w[1]["pid"] == w[0]["pid"] and w[1]["job"] == 2, "the second trial, in the same worker"
    # trial 1 crashed: its worker ended, and trial 2 got a fresh one
    assert w[2]["pid"] != w[1]["pid"] and w[2]["job"] == 1
    assert w[3]["pid"] == w[2]["pid"] and w[3]["job"] == 2 and w[3]["model_reused"] is True, "after a pruned trial"
    assert w[3]["gc_frozen"] > 100_000, "what the first job left (imports, the model) is frozen"
    assert w[4]["job"] == 1, "a new `sweep run` starts its own workers"
    logs = sorted((e2e["ws"] / "runs" / "e2e" / "workers").glob("worker-*.log"))
    assert len(logs) == 3, logs  # two in the first `sweep run`, one in the second
    assert sum("exit code 1" in log.read_text() for log in logs) == 1


@pytest.mark.e2e
def test_a_trial_in_a_warm_worker_trains_exactly_like_a_fresh_process(e2e, tmp_path):
    """Trial 3 ran in a worker that had trained trial 2 on the same model: a fresh process must agree."""
    trial = next(t for t in e2e["study"].trials if t.number == 3)
    assert trial.user_attrs["worker"]["model_reused"] is True
    work = Path(trial.user_attrs["work_dir"])
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("train.jsonl", "rows.jsonl"):
        if (work / name).exists():
            shutil.copyfile(work / name, fresh / name)
    text = (work / "config.py").read_text().replace(str(work), str(fresh))
    assert str(work.parent / "baseline") in text
    # its own step-0 file: the fresh process measures the untrained point instead of reading the study's
    (fresh / "config.py").write_text(text.replace(str(work.parent / "baseline"), str(fresh / "baseline")))
    (fresh / "sweep_control.json").write_text(json.dumps({"step": 10**9, "stop": False}))  # never prune it
    launch = launcher.Launch(fresh / "config.py", fresh, fresh / "train.log", threads=2)
    rc = launcher.run(launch, on_poll=lambda: None)
    assert rc == 0, launcher.log_tail(fresh / "train.log")

    warm_val = {e["step"]: e["val/loss"] for e in _events(work / "sweep_metrics.jsonl", "val")}
    fresh_val = {e["step"]: e["val/loss"] for e in _events(fresh / "sweep_metrics.jsonl", "val")}
    common = sorted(set(warm_val) & set(fresh_val))
    assert len(common) >= 2, (warm_val, fresh_val)
    for step in common:
        assert warm_val[step] == pytest.approx(fresh_val[step], rel=1e-5), step
    warm_train = [e["train/loss"] for e in _events(work / "sweep_metrics.jsonl", "train")]
    fresh_train = [e["train/loss"] for e in _events(fresh / "sweep_metrics.jsonl", "train")]
    assert warm_train == pytest.approx(fresh_train[: len(warm_train)], rel=1e-5)
    assert warm_val[0] == pytest.approx(fresh_val[0], rel=1e-6), "the untrained model is the same model"
    assert _events(work / "sweep_metrics.jsonl", "val")[0].get("baseline") == "cached"
    assert "baseline" not in _events(fresh / "sweep_metrics.jsonl", "val")[0], "measured, not read"


@pytest.mark.e2e
def test_the_untrained_point_is_measured_once_per_study(e2e):
    """Trial 0 measures step 0 (loss, general loss, ROUGE-L, probe answers); later trials read it."""
    trials = {t.number: t for t in e2e["study"].trials}
    first = {}
    for number in (0, 2, 3, 4):
        stream = Path(trials[number].user_attrs["work_dir"]) / "sweep_metrics.jsonl"
        point = _events(stream, "val")[0]
        samples = [e for e in _events(stream, "samples") if e["step"] == 0]
        assert point["step"] == 0 and samples, number
        values = {k: v for k, v in point.items() if k.startswith("val/")}
        assert {"val/loss", "val/general_loss", "val/rouge_l"} <= values.keys()
        if number == 0:
            assert "baseline" not in point, "the first trial measures it"
            first = {"values": values, "rows": samples[0]["rows"]}
        else:
            assert point["baseline"] == "cached", number
            assert values == first["values"] and samples[0]["rows"] == first["rows"], number
    (stored,) = (e2e["ws"] / "runs" / "e2e" / "baseline").glob("*.json")
    assert json.loads(stored.read_text())["metrics"]["val/loss"] == first["values"]["val/loss"]


def _sleeper(gpu: int, jobs: int = 1) -> Worker:
    return Worker(subprocess.Popen(["sleep", "600"], start_new_session=True), (gpu,), None, jobs=jobs)


def test_idle_workers_make_room_for_a_trial_that_needs_their_memory(tmp_path):
    slots = GpuSlots({0: 10_000.0, 1: 10_000.0})  # trials may plan 9,200 MB of each
    pool = WorkerPool(tmp_path, slots, idle_mb=3_000.0)
    idle = [_sleeper(0), _sleeper(0), _sleeper(0), _sleeper(1)]
    ahead = _sleeper(0, jobs=0)  # started ahead of the first trial, no job yet: no model, no CUDA context
    pool._workers = [*idle, ahead]
    try:
        slots.acquire(5_000.0)  # GPU 0 (the emptiest, lowest index): 4,200 MB left, room for one idle worker
        with pool._lock:
            leaving = pool._make_room((0,))
        for worker in leaving:
            worker.kill()
        assert len(leaving) == 2
        on_gpu0 = [w for w in pool.idle_workers() if w.gpus == (0,) and w.jobs]
        assert len(on_gpu0) == 1 and on_gpu0[0].alive()
        ended = [w for w in idle[:3] if w not in on_gpu0]
        assert all(w.proc.returncode is not None for w in ended), "ended workers' processes are gone"
        assert idle[3] in pool.idle_workers() and idle[3].alive(), "another GPU's idle worker stays"
        assert ahead in pool.idle_workers() and ahead.alive(), "a worker that holds no memory is not ended for room"
    finally:
        pool.close()
    assert all(not w.alive() for w in [*idle, ahead])


def test_a_worker_that_dies_in_a_job_reports_its_exit_code(tmp_path, monkeypatch):
    """No done file and the process gone: the job's exit code is the process's, never a hang, and
    what the worker printed outside the job (here, all of it) ends the job's log."""
    pool = WorkerPool(tmp_path)
    worker_log = tmp_path / "worker.log"
    with worker_log.open("wb") as out:
        script = "read line; echo 'worker could not start: no such module' >&2; exit 7"
        worker = Worker(subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True), (), None, worker_log)  # fmt: skip
    monkeypatch.setattr(pool, "_spawn", lambda launch: worker)
    launch = launcher.Launch(tmp_path / "config.py", tmp_path / "work", tmp_path / "work" / "train.log")
    launch.work_dir.mkdir()
    started = time.monotonic()
    rc = launcher.run(launch, on_poll=lambda: None, start=pool.start)
    assert rc == 7 and time.monotonic() - started < 30
    assert not pool._workers, "a dead worker is not handed out again"
    tail = launcher.log_tail(launch.log)
    assert f"resident worker {worker.proc.pid} exited with code 7" in tail
    assert "worker could not start: no such module" in tail


def test_stripping_a_trial_gives_back_the_model_as_loaded(tiny_model):
    """LoRA off, checkpointing off, grad hooks off: the state a fresh process loads; PiSSA-like inits are not reused."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sweep.training.base_model import strip_training_state

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: type(m) for n, m in model.named_modules()}
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert {n: type(m) for n, m in model.named_modules()} != modules
    assert strip_training_state(model) is True
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert not model.is_gradient_checkpointing and not model.get_input_embeddings()._forward_hooks
    assert not any(p.requires_grad for p in model.parameters()) and "peft_config" not in vars(model)

    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora"))
    assert strip_training_state(model) is False, "OLoRA rewrote the base weights: never reuse them"


class _Runner:
    me: _Runner


def test_what_a_job_leaves_is_frozen_and_a_dropped_base_model_still_collected(tiny_model):
    """After a job the survivors are frozen (the next job's collection walks only its own objects), yet a
    base model the worker lets go (another model came) is collected, cycles and all, not kept frozen."""
    import gc
    import weakref

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def a_trained_base_model():
        llm = AutoModelForCausalLM.from_pretrained(tiny_model)
        get_peft_model(llm, LoraConfig(r=4, target_modules=["q_proj"]))
        llm._cycle = [llm]  # a reference cycle, as real models and their hooks have
        return llm

    CACHE.models.clear()
    try:
        CACHE.models["first"] = a_trained_base_model()
        old = weakref.ref(CACHE.models["first"])
        CACHE.reused = False  # the job that loaded it
        job.forget_runner_state(job.manager_instances())
        assert gc.get_freeze_count() > 0 and old() is not None, "kept for the next job, frozen"

        CACHE.reused = True  # a warm job: LoRA injected into the kept model again, as XTuner does
        get_peft_model(CACHE.models["first"], LoraConfig(r=4, target_modules=["q_proj"]))
        runner = _Runner()
        runner.me = runner  # what a job leaves: cyclic garbage made after the freeze
        made = weakref.ref(runner)
        del runner
        job.forget_runner_state(job.manager_instances())
        assert made() is None and old() is not None, "a warm job: its garbage goes, the model stays"

        CACHE.models.clear()  # another model came: the first one goes (what build_llm_from_cfg does)
        CACHE.models["second"] = a_trained_base_model()
        CACHE.reused = False
        job.forget_runner_state(job.manager_instances())
        assert old() is None, "the dropped model was frozen with the rest; unfrozen, it was collected"
    finally:
        CACHE.models.clear()
        CACHE.reused = False
        gc.unfreeze()


def test_a_worker_outlives_the_thread_that_started_it(tmp_path):
    """Optuna's n_jobs threads end while other threads' trials still use the workers they started."""
    import threading

    pool = WorkerPool(tmp_path)
    launch = launcher.Launch(tmp_path / "config.py", tmp_path / "work", tmp_path / "train.log", threads=1)
    started: list[Worker] = []
    thread = threading.Thread(target=lambda: started.append(pool._spawn(launch)))
    thread.start()
    thread.join()
    try:
        time.sleep(2.0)  # a parent-death signal tied to the thread would have ended it by now
        assert started[0].alive(), f"worker ended with {started[0].proc.returncode} when its thread ended"
    finally:
        started[0].kill()
    assert not started[0].alive()


def _environ_after_exec(pid: int, timeout: float = 10.0) -> list[bytes]:
    """A just-started child's environment from /proc, read again while it is empty: one read right after Popen
    returned came back empty once (``make test``, 2026-12-07)."""
    deadline = time.monotonic() + timeout
    while True:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if environ != [b""] or time.monotonic() > deadline:
            return environ
        time.sleep(0.05)


def test_workers_started_ahead_serve_the_first_trials_on_their_gpus(tmp_path, monkeypatch):
    """`sweep run` starts its workers before preparing data and MLflow: a trial on a GPU takes the idle worker
    started for that GPU (its cold start already paid) instead of starting one."""
    slots = GpuSlots({0: 80_000.0, 1: 80_000.0})  # fake devices: the workers only see CUDA_VISIBLE_DEVICES
    pool = WorkerPool(tmp_path / "workers", slots, idle_mb=3_000.0)
    pool.prewarm(2, [0, 1], threads=1)
    try:
        ahead = list(pool.idle_workers())
        assert [w.gpus for w in ahead] == [(0,), (1,)] and all(w.alive() for w in ahead)
        for worker in ahead:
            assert f"CUDA_VISIBLE_DEVICES={worker.gpus[0]}".encode() in _environ_after_exec(worker.proc.pid)
        monkeypatch.setattr(pool, "_spawn", lambda launch: pytest.fail("a worker was started for a warm GPU"))
        work = tmp_path / "trial"
        work.mkdir()
        launch = launcher.Launch(work / "config.py", work, work / "train.log", n_gpus=1, gpu_ids=[1], threads=1)
        job_ = pool.start(launch)
        assert job_.worker is ahead[1], "the worker started for GPU 1"
        assert job_.wait() != 0, "no config.py: the job fails, and its worker ends"
        assert [w.gpus for w in pool.idle_workers()] == [(0,)]
    finally:
        pool.close()
    assert not any(w.alive() for w in ahead)


def test_a_trial_takes_an_idle_worker_that_holds_the_model_before_one_started_ahead(tmp_path):
    pool = WorkerPool(tmp_path)
    ahead, warm = (
        Worker(subprocess.Popen(["sleep", "600"], stdin=subprocess.PIPE, start_new_session=True), (0,), 1, jobs=n)
        for n in (0, 2)
    )
    pool._workers = [ahead, warm]
    try:
        work = tmp_path / "trial"
        work.mkdir()
        job_ = pool.start(launcher.Launch(work / "config.py", work, work / "train.log", gpu_ids=[0], threads=1))
        assert job_.worker is warm and warm.jobs == 3, "the worker with the model loaded, not the cold one"
        assert pool.idle_workers() == [ahead]
    finally:
        pool.close()
    assert not ahead.alive() and not warm.alive()


def test_sweep_run_starts_its_workers_before_it_imports_mlflow(tmp_path, tiny_model):
    """Importing MLflow, torch and XTuner takes seconds (more on a machine whose packages have no bytecode yet):
    when the spec gives the batch size and max_length, `sweep run` starts its workers before its checks import
    them, so that the workers' cold start runs beside the sweep's. Pinned to one CPU (as `taskset` pins it), the
    sweep plans one thread for a CPU trial, not one per CPU of the machine."""
    from tests.conftest import write_spec

    spec = write_spec(tmp_path, tiny_model, n_trials="n_trials: 2")
    script = (
        "import os, sys\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from sweep.trial.pool import WorkerPool\n"
        "def prewarm(self, n, gpus, threads):\n"
        "    print('workers', n, 'threads', threads, flush=True)\n"
        "    print('mlflow imported' if 'mlflow' in sys.modules else 'mlflow not imported', flush=True)\n"
        "    print('imported:', sorted(m for m in ('torch', 'xtuner', 'transformers') if m in sys.modules), flush=True)\n"
        "    raise SystemExit(0)\n"
        "WorkerPool.prewarm = prewarm\n"
        "from sweep.cli import main\n"
        f"main(['run', {str(spec)!r}, '--storage', 'sqlite:///{tmp_path}/s.db',"
        f" '--tracking-uri', 'sqlite:///{tmp_path}/m.db', '--work-dir', {str(tmp_path / 'runs')!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mlflow not imported" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "imported: []" in done.stdout, done.stdout
    assert "workers 1 threads 1" in done.stdout, done.stdout


def test_workers_started_for_gpus_torch_cannot_see_end_and_the_trials_run_on_the_cpu(tmp_path, tiny_model,
                                                                                      monkeypatch, caplog):  # fmt: skip
    """nvidia-smi lists a GPU but torch sees none (a CPU build of torch on a GPU machine): the workers started ahead
    for the GPU are ended with their logs, the user is told, and the trial trains in a CPU worker."""
    import logging
    import os

    from optuna.trial import TrialState

    from sweep import study as study_mod
    from sweep.spec import load_spec
    from tests.conftest import write_spec

    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '0, 81559'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    spawned: list[Worker] = []
    spawn = WorkerPool._spawn
    monkeypatch.setattr(WorkerPool, "_spawn", lambda self, launch: spawned.append(spawn(self, launch)) or spawned[-1])
    fixed = "fixed: {max_length: 64, max_epochs: 1, batch_size: 4, accumulative_counts: 1}"
    spec = load_spec(write_spec(tmp_path, tiny_model, study="study: smi", n_trials="n_trials: 1", fixed=fixed,
                                pruner="pruner: {type: none}", registry=""))  # fmt: skip
    opts = study_mod.RunOptions(storage=f"sqlite:///{tmp_path / 's.db'}", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                                work_dir=tmp_path / "runs")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="sweep"):
        study_mod.run(spec, opts)
    assert "nvidia-smi lists GPUs but torch does not see them" in caplog.text
    gpu_workers = [w for w in spawned if w.gpus == (0,)]
    cpu_workers = [w for w in spawned if w.gpus == ()]
    assert gpu_workers and cpu_workers, [w.gpus for w in spawned]
    assert not any(w.log.exists() for w in gpu_workers), "the GPU workers' logs were removed"
    trial = study_mod.open_study(spec, opts.storage).trials[0]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("error")
    assert trial.user_attrs["worker"]["job"] == 1


def _fake_worker(gpu: int) -> Worker:
    return Worker(subprocess.Popen(["sleep", "600"], stdin=subprocess.PIPE, start_new_session=True), (gpu,), 1)


def test_trials_at_once_go_to_the_worker_that_trains_others_until_it_is_full(tmp_path, monkeypatch):
    """speed.trials_per_worker 3: a GPU's first three trials share one worker (one base model, joined steps), the
    fourth starts another; a failed job's worker takes no more and ends only when the jobs beside it are done."""
    pool = WorkerPool(tmp_path, at_once=3)
    spawned: list[Worker] = []

    def spawn(launch):
        spawned.append(_fake_worker(launch.gpu_ids[0]))
        return spawned[-1]

    monkeypatch.setattr(pool, "_spawn", spawn)
    work = tmp_path / "trial"
    work.mkdir()

    def start(gpu: int):
        return pool.start(launcher.Launch(work / "config.py", work, work / "train.log", gpu_ids=[gpu], threads=1))

    try:
        jobs = [start(0) for _ in range(4)] + [start(1)]
        assert [j.worker for j in jobs[:3]] == [spawned[0]] * 3 and spawned[0].running == 3
        assert jobs[3].worker is spawned[1] and jobs[4].worker is spawned[2] and spawned[2].gpus == (1,)
        pool._returned(spawned[0], reusable=False)  # one of its jobs failed
        assert spawned[0].draining and spawned[0].alive(), "the jobs beside the failed one train on"
        assert start(0).worker is spawned[1], "a draining worker takes no new job"
        pool._returned(spawned[0], reusable=True)
        pool._returned(spawned[0], reusable=True)
        assert not spawned[0].alive() and spawned[0] not in pool._workers, "ended once its last job was done"
        pool._returned(spawned[2], reusable=True)
        assert spawned[2] in pool.idle_workers() and spawned[2].alive(), "idle, holding its model for the next job"
    finally:
        pool.close()
    assert not any(w.alive() for w in spawned)


def test_a_worker_with_jobs_at_once_finishes_the_others_after_one_fails_and_takes_no_more(tmp_path, monkeypatch):
    """The worker side: jobs in threads, each one's Python output in its own log, a done file per job; after a
    failure no later job starts (it is answered NOT_STARTED), and the worker returns once stdin closes and the
    running ones are done."""
    import threading

    from sweep.training import worker
    from sweep.trial import protocol

    release = threading.Event()

    def train(argv):
        print(f"training {argv[0]}")
        if argv[0] == "bad":
            raise RuntimeError("this job fails")
        release.wait(30)  # the good job is still running when the bad one fails

    monkeypatch.setattr(worker.training_job, "train_in_this_process", train)
    monkeypatch.setattr(worker, "_memory_held", lambda: {})
    monkeypatch.setattr(worker.cotrain, "guard_data_loaders", lambda: None)
    monkeypatch.setattr(worker, "_current_instance_per_thread", lambda: None)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # serve_at_once replaces them; monkeypatch restores them
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    jobs = [protocol.Job([name], str(tmp_path / f"{name}.log"), str(tmp_path / f"{name}.done")) for name in
            ("good", "bad", "later")]  # fmt: skip
    lines = iter([jobs[0].to_line().decode(), jobs[1].to_line().decode()])

    def feed():
        yield from lines
        while not (tmp_path / "bad.done").exists():
            time.sleep(0.05)
        release.set()
        yield jobs[2].to_line().decode()  # sent after the failure: not started

    done = threading.Thread(target=worker.serve_at_once, args=(feed(), 3))
    done.start()
    done.join(timeout=60)
    assert not done.is_alive()
    results = {name: protocol.Done.read(tmp_path / f"{name}.done") for name in ("good", "bad", "later")}
    assert results["good"].rc == 0 and results["bad"].rc == 1
    assert results["later"].rc == protocol.NOT_STARTED and not (tmp_path / "later.log").exists(), "answered, not run"
    assert (tmp_path / "good.log").read_text() == "training good\n"
    bad_log = (tmp_path / "bad.log").read_text()
    assert bad_log.startswith("training bad\n") and "RuntimeError: this job fails" in bad_log


def test_a_job_a_draining_worker_did_not_start_goes_to_another_worker(tmp_path, monkeypatch):
    from sweep.trial import protocol

    pool = WorkerPool(tmp_path, at_once=2)
    spawned: list[Worker] = []
    monkeypatch.setattr(pool, "_spawn", lambda launch: spawned.append(_fake_worker(0)) or spawned[-1])
    work = tmp_path / "trial"
    work.mkdir()
    try:
        job_ = pool.start(launcher.Launch(work / "config.py", work, work / "train.log", gpu_ids=[0], threads=1))
        first = job_.worker
        protocol.Done(protocol.NOT_STARTED).write(job_.done)  # the worker's other job had failed
        assert job_.poll() is None, "not a result: the job was never started"
        assert job_.worker is not first and job_.worker.running == 1 and job_.worker.jobs == 1
        assert first.running == 0 and not first.alive(), "the draining worker, with nothing left to run, ended"
        assert not job_.done.exists(), "the old answer is gone; the new worker's will come"
    finally:
        pool.close()
