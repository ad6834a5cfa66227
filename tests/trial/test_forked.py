"""Resident workers forked from one fork server (``speed.fork_workers``): real server, real forks, real jobs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from sweep.trial import launcher, protocol
from sweep.trial.pool import WorkerPool


def _launch(tmp_path: Path, name: str, gpu: int | None = None, threads: int | None = 1) -> launcher.Launch:
    work = tmp_path / name
    work.mkdir(parents=True, exist_ok=True)
    return launcher.Launch(work / "config.py", work, work / "train.log", gpu_ids=[] if gpu is None else [gpu],
                           threads=threads)  # fmt: skip


def _until(check, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _send_failing_job(worker, work: Path) -> Path:
    """A job whose config does not exist: the worker answers it with a non-zero exit code and ends."""
    done = work / protocol.DONE_FILE
    job = protocol.Job([str(work / "missing.py")], str(work / "train.log"), str(done))
    worker.proc.stdin.write(job.to_line())
    worker.proc.stdin.flush()
    return done


def test_workers_are_forked_from_one_server_each_with_its_own_environment_group_and_exit_code(tmp_path, monkeypatch):
    # as from a sweep process that never ran `sweep`'s entry (tests, library use): the server's package sets them
    monkeypatch.delenv("USE_TF", raising=False)
    monkeypatch.delenv("USE_FLAX", raising=False)
    pool = WorkerPool(tmp_path / "workers", fork=True)
    try:
        first = pool._spawn(_launch(tmp_path, "a", gpu=0, threads=1))
        second = pool._spawn(_launch(tmp_path, "b", gpu=1, threads=2))
        server = pool.server
        assert server is not None and first.proc.pid is None, "asked before the server's imports are done"
        _until(lambda: first.proc.pid and second.proc.pid, what="both forks")
        for worker in (first, second):
            _until(lambda w=worker: ": ready at" in w.log.read_text(), what="the worker's ready line")
            assert f"(forked from {server.proc.pid})" in worker.log.read_text()
            assert os.getpgid(worker.proc.pid) == worker.proc.pid, "each fork leads its own group (killpg ends it)"
            with open(f"/proc/{worker.proc.pid}/stat") as f:
                assert int(f.read().rsplit(")", 1)[1].split()[1]) == server.proc.pid, "a child of the server"
        # its own environment (what CUDA reads when the worker initializes it) and thread count, not the server's
        assert "GPUs 0, 1 CPU threads" in first.log.read_text()
        assert "GPUs 1, 2 CPU threads" in second.log.read_text()
        server_env = _environ(server.proc.pid)
        assert server_env["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1", "torch asks NVML, not CUDA"
        assert server_env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES"), "no GPU of its own"

        done = _send_failing_job(first, tmp_path / "a")
        assert first.proc.wait(timeout=60) == 0, "a worker whose job failed ends, as one started on its own does"
        assert protocol.Done.read(done).rc != 0
        assert second.alive()
        launcher.stop_groups([second.proc], grace=10)
        assert second.proc.returncode == -signal.SIGTERM
    finally:
        pool.close()
    assert server.proc.returncode is not None and pool.server is None


def test_a_request_made_while_the_server_imports_gets_its_job_and_one_ended_before_its_fork_never_runs(tmp_path):
    pool = WorkerPool(tmp_path / "workers", fork=True)
    try:
        asked = pool._spawn(_launch(tmp_path, "a"))
        done = _send_failing_job(asked, tmp_path / "a")  # written to the pipe before there is a process to read it
        cancelled = pool._spawn(_launch(tmp_path, "b"))
        launcher.stop_groups([cancelled.proc], grace=10)
        assert cancelled.proc.returncode == -signal.SIGTERM and cancelled.proc.pid is None, "ended at once, unforked"
        assert asked.proc.wait(timeout=120) == 0 and protocol.Done.read(done).rc != 0
        _until(lambda: cancelled.proc.pid is not None, what="the cancelled request's answer")
        _until(lambda: not Path(f"/proc/{cancelled.proc.pid}").exists()
               or Path(f"/proc/{cancelled.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
               what="the cancelled fork's end")  # fmt: skip
        assert cancelled.proc.stdin.closed, "a fork that slipped through would find no job and end"
    finally:
        pool.close()


def test_workers_start_on_their_own_where_the_fork_server_dies(tmp_path):
    """A request the server can no longer answer starts as a worker process of its own, with the jobs already sent."""
    pool = WorkerPool(tmp_path / "workers", fork=True)
    try:
        waiting = pool._spawn(_launch(tmp_path, "a"))
        done = _send_failing_job(waiting, tmp_path / "a")
        os.killpg(pool.server.proc.pid, signal.SIGKILL)
        _until(lambda: pool.server.gone, what="the sweep to see the server gone")
        assert "the fork server ended" in pool.server.reason
        later = pool._spawn(_launch(tmp_path, "b"))
        assert waiting.proc.wait(timeout=120) == 0 and protocol.Done.read(done).rc != 0
        _until(lambda: ": ready at" in later.log.read_text(), timeout=120, what="the later worker's ready line")
        for worker in (waiting, later):
            text = worker.log.read_text()
            assert ": ready at" in text and "forked from" not in text, text[-2000:]
        launcher.stop_groups([later.proc], grace=10)
        assert later.proc.returncode == -signal.SIGTERM
    finally:
        pool.close()


def test_the_server_answers_bitsandbytes_capability_question_without_initializing_cuda(monkeypatch):
    """bitsandbytes asks every GPU's compute capability while it is imported, which initializes CUDA in torch; a
    process that did can fork no worker that uses a GPU. The server answers from NVML for the time of its imports."""
    import torch

    from sweep.training import forkserver

    monkeypatch.setattr(forkserver, "_nvml_capabilities", lambda: [(8, 0), (9, 0)])
    original = torch.cuda.get_device_capability
    with forkserver._capability_from_nvml():
        assert torch.cuda.get_device_capability(torch.cuda.device(0)) == (9, 0)
        assert torch.cuda.get_device_capability() == (9, 0)
        assert not torch.cuda.is_initialized()
    assert torch.cuda.get_device_capability is original
    monkeypatch.setattr(forkserver, "_nvml_capabilities", lambda: None)
    monkeypatch.setattr(
        torch.cuda, "_lazy_init", lambda: None
    )  # never torch's own here: a GPU machine would start CUDA
    stand_in = torch.cuda._lazy_init
    seen: dict[str, str] = {}
    with forkserver._capability_from_nvml(seen):
        assert torch.cuda.get_device_capability is original, "without NVML torch's own answer (and `unsafe` after)"
        torch.cuda._lazy_init()  # as an import might: the `unsafe` reason says where it was
    assert seen["nvml"] == "NVML could not answer"
    assert "test_forked.py" in seen["cuda_init"] and "test_the_server_answers_bitsandbytes" in seen["cuda_init"]
    assert torch.cuda._lazy_init is stand_in, "the initialization in place before is back"


def test_forks_are_the_default_on_the_cpu_and_on_gpus_and_off_turns_them_off(tmp_path, tiny_model):
    """auto forks on GPUs too since the H100 run where every worker of a LoRA and a QLoRA sweep was forked."""
    from sweep import study as study_mod
    from sweep.spec import load_spec
    from sweep.trial.placement import GpuSlots
    from tests.conftest import write_spec

    for speed, gpu, fork in [("", False, True), ("", True, True), ("fork_workers: on", True, True),
                             ("fork_workers: off", False, False), ("fork_workers: off", True, False)]:  # fmt: skip
        folder = tmp_path / f"{speed.replace(': ', '-') or 'auto'}-{gpu}"
        folder.mkdir()
        spec = load_spec(write_spec(folder, tiny_model, **({"speed": f"speed: {{{speed}}}"} if speed else {})))
        slots = GpuSlots({0: 80_000.0}) if gpu else None
        pool = study_mod._worker_pool(spec, folder, slots, None)
        assert pool.fork is fork, (speed, gpu)


@pytest.mark.parametrize("kind", ["ready", "unsafe", "forked", "exited"])
def test_fork_news_survive_the_socket(kind):
    news = protocol.ForkNews(kind, ref=3, pid=1234, rc=-9, reason="why")
    assert protocol.ForkNews.from_bytes(news.to_bytes()) == news
    request = protocol.Fork(7, {"CUDA_VISIBLE_DEVICES": "0"})
    assert protocol.Fork.from_bytes(request.to_bytes()) == request


def test_a_worker_whose_environment_differs_from_the_servers_where_imports_read_it_starts_afresh(tmp_path):
    """Modules read their environment when imported (the base-model cache reads the jobs-at-once count): a fork
    asked for with another value would run with the server's. It execs a fresh worker instead, in the same process."""
    pool = WorkerPool(tmp_path / "workers", fork=True)
    try:
        same = pool._spawn(_launch(tmp_path, "a", gpu=0))
        pool.at_once = 2  # every worker of a pool has the same count; only a test changes it
        other = pool._spawn(_launch(tmp_path, "b", gpu=0))
        for worker in (same, other):
            _until(lambda w=worker: ": ready at" in w.log.read_text(), timeout=120, what="the ready line")
        assert "(forked from" in same.log.read_text()
        text = other.log.read_text()
        assert f"differs from the fork server's in {protocol.JOBS_AT_ONCE_ENV}: started afresh" in text, text
        assert "(forked from" not in text and "2 jobs at once" in text
        assert other.proc.pid is not None and other.alive(), "the same process the server forked, exec'd"
    finally:
        pool.close()


def test_the_server_has_its_nvml_answer_in_place_before_bitsandbytes_is_imported(tmp_path):
    """The first H100 run imported the worker module (and with it bitsandbytes, which asks for the GPUs' capability)
    before the NVML answer was in place, and CUDA started in the server. A fresh interpreter, as the server is: when
    bitsandbytes is first looked for, ``torch.cuda.get_device_capability`` must already be the server's answer."""
    import subprocess
    import sys

    script = """
import sys, torch
from sweep.training import forkserver
forkserver._nvml_capabilities = lambda: [(9, 0)]
at_import = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes" and not at_import:
            at_import.append(torch.cuda.get_device_capability.__module__)
sys.meta_path.insert(0, Watch())
assert "bitsandbytes" not in sys.modules
forkserver.import_training_stack({})
print(at_import)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "['sweep.training.forkserver']", out.stdout[-2000:]


def test_a_request_the_server_cannot_fork_starts_on_its_own_and_the_server_serves_on(tmp_path):
    """A failed fork (a process limit, memory) must not end the server, whose forks die with it."""
    import stat
    import subprocess
    import sys

    from sweep.trial.forked import ForkServer

    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/bin/sh
exec {sys.executable} -c 'import os, sys, runpy
def refuse():
    raise BlockingIOError(11, "Resource temporarily unavailable")
os.fork = refuse
runpy.run_module("sweep.training.forkserver", run_name="__main__")' "$3"
""")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = ForkServer(env, tmp_path / "server.log", str(wrapper))
    log = tmp_path / "worker.log"

    def own(stdin: int, output: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", protocol.WORKER_MODULE], stdin=stdin, stdout=output,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip

    try:
        with log.open("ab") as out:
            proc = server.spawn(env, out.fileno(), own)
        _until(lambda: ": ready at" in log.read_text(), timeout=120, what="the worker's ready line")
        assert "(forked from" not in log.read_text() and proc.pid is not None
        assert not server.gone and server.proc.poll() is None, "the server serves on"
        launcher.stop_groups([proc], grace=10)
        assert proc.returncode == -signal.SIGTERM
    finally:
        server.close()
