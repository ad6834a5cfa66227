"""The sweep's private MPS server (sweep.trial.mps), with stand-ins for nvidia-cuda-mps-control, nvidia-smi and a
CUDA client.

The stand-in daemon keeps MPS's contract as far as the sweep relies on it: `-d` starts it (here: a real background
process whose pid is in the pipe folder, and the control socket's file), commands arrive on stdin and fail while no
daemon runs there, `get_server_list` prints the server's pid once a client has connected, and `quit` ends it. Every
call is recorded with the pipe folder it was made for and the CUDA_VISIBLE_DEVICES it saw.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sweep.trial import mps
from sweep.trial.placement import GpuSlots

CONTROL = f"""#!{sys.executable}
import os, subprocess, sys, pathlib
pipe = pathlib.Path(os.environ["CUDA_MPS_PIPE_DIRECTORY"])
record = pathlib.Path(os.environ["FAKE_MPS_RECORD"])
seen = os.environ.get("CUDA_VISIBLE_DEVICES", "-")
if sys.argv[1:] == ["-d"]:
    with record.open("a") as f:
        f.write(f"-d {{pipe}} {{seen}}\\n")
    if os.environ.get("FAKE_MPS_SILENT") != "1":
        daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "nvidia-cuda-mps-control"],
                                  start_new_session=True, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # a daemon closes its stdio
        (pipe / "nvidia-cuda-mps-control.pid").write_text(str(daemon.pid))
        (pipe / "control").write_text("")
    sys.exit(int(os.environ.get("FAKE_MPS_DAEMON_RC", "0")))
command = sys.stdin.read().strip()
with record.open("a") as f:
    f.write(f"{{command}} {{pipe}}\\n")
if not (pipe / "control").exists():
    sys.exit(1)
if command == "get_server_list" and (pipe / "server").exists():
    print((pipe / "server").read_text())
if command == "quit":
    if os.environ.get("FAKE_MPS_QUIT_FAILS"):
        sys.exit(2)
    os.kill(int((pipe / "nvidia-cuda-mps-control.pid").read_text()), 9)
    (pipe / "control").unlink()
"""

CLIENT = f"""#!{sys.executable}
import os, sys, pathlib
pipe = pathlib.Path(os.environ["CUDA_MPS_PIPE_DIRECTORY"])
with open(os.environ["FAKE_MPS_RECORD"], "a") as f:
    f.write(f"client {{pipe}} {{os.environ['CUDA_VISIBLE_DEVICES']}}\\n")
if os.environ.get("FAKE_MPS_CLIENT_FAILS") or not (pipe / "control").exists():
    sys.exit("no server")
if not os.environ.get("FAKE_MPS_CLIENT_ALONE"):  # a client that ran without the server leaves it unstarted
    (pipe / "server").write_text("4242")
"""


@pytest.fixture
def fake_mps(tmp_path, monkeypatch):
    """The stand-ins on PATH, two Default-mode GPUs; returns the record of calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in ((mps.CONTROL, CONTROL), ("client", CLIENT),
                       ("nvidia-smi", '#!/bin/sh\nprintf "0, ${FAKE_MODE0:-Default}\\n1, Default\\n"\n')):  # fmt: skip
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setattr(mps, "probe_command", lambda: [str(bin_dir / "client")])
    monkeypatch.setattr(mps, "SYSTEM_PIPE", tmp_path / "system-mps")
    record = tmp_path / "record.txt"
    record.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_RECORD", str(record))
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    short = tempfile.mkdtemp(prefix="mps-test-", dir="/tmp")  # pytest's own folders are too long for sockets
    (tmp_path / "tmp").symlink_to(short)
    monkeypatch.setattr(tempfile, "tempdir", short)
    yield record
    shutil.rmtree(short, ignore_errors=True)


def _left(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "tmp").glob("xtuner-sweep-mps-*"))


def _calls(record: Path) -> list[str]:
    return record.read_text().splitlines()


def _gone(pid: int) -> bool:
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_private_server_starts_answers_and_quits_leaving_nothing(fake_mps, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")  # the user's: the daemon must number GPUs as the driver does
    server = mps.start([0, 1], wait=5)
    pipe = Path(server.env[mps.PIPE_ENV])
    daemon = int((pipe / "nvidia-cuda-mps-control.pid").read_text())
    assert pipe.parent == server.folder and Path(server.env[mps.LOG_ENV]).is_dir()
    assert len(str(pipe / "control")) < 107, "a Unix socket's path must fit sun_path"
    assert _calls(fake_mps) == [f"-d {pipe} -", f"get_server_list {pipe}", f"client {pipe} 0,1",
                                f"get_server_list {pipe}"]  # fmt: skip
    server.stop()
    assert _calls(fake_mps)[-1] == f"quit {pipe}" and _gone(daemon)
    assert not server.folder.exists() and not _left(tmp_path)
    server.stop()  # twice: nothing left to do
    assert _calls(fake_mps)[-1] == f"quit {pipe}"


def test_a_daemon_that_does_not_quit_is_killed(fake_mps, tmp_path, monkeypatch):
    server = mps.start([0], wait=5)
    daemon = int((Path(server.env[mps.PIPE_ENV]) / "nvidia-cuda-mps-control.pid").read_text())
    monkeypatch.setenv("FAKE_MPS_QUIT_FAILS", "1")
    server.stop()
    assert _gone(daemon), "killed by its pid file"
    assert not _left(tmp_path)


@pytest.mark.parametrize(
    ("setup", "reason", "daemon_started"),
    [
        (lambda mp, tmp: mp.setenv(mps.PIPE_ENV, str(tmp / "theirs")), "CUDA_MPS_PIPE_DIRECTORY is set", False),
        (
            lambda mp, tmp: (tmp / "system-mps").mkdir() or (tmp / "system-mps/control").touch(),
            "of this machine",
            False,
        ),
        (lambda mp, tmp: mp.setenv("FAKE_MODE0", "Exclusive_Process"), "GPU 0 Exclusive_Process", False),
        (lambda mp, tmp: mp.setenv("FAKE_MPS_DAEMON_RC", "3"), "-d exited 3", True),
        (lambda mp, tmp: mp.setenv("FAKE_MPS_SILENT", "1"), "did not answer within 1 s", True),
        (lambda mp, tmp: mp.setenv("FAKE_MPS_CLIENT_FAILS", "1"), "a CUDA client could not use the MPS server", True),
        (lambda mp, tmp: mp.setenv("FAKE_MPS_CLIENT_ALONE", "1"), "lists no server", True),
    ],
    ids=["user-server", "system-daemon", "compute-mode", "daemon-fails", "daemon-silent", "client-fails", "no-server"],
)
def test_no_server_is_left_where_one_cannot_or_must_not_start(fake_mps, tmp_path, monkeypatch, setup, reason,
                                                              daemon_started):  # fmt: skip
    setup(monkeypatch, tmp_path)
    with pytest.raises(mps.MpsUnavailable, match=reason):
        mps.start([0], wait=1)
    calls = _calls(fake_mps)
    assert any(c.startswith("-d ") for c in calls) == daemon_started, calls
    if daemon_started:
        assert calls[-1].startswith("quit "), f"the daemon it started is quit: {calls}"
    assert not _left(tmp_path), "its folders are removed"


def test_a_temp_folder_too_long_for_sockets_gives_way_to_tmp(fake_mps, tmp_path, monkeypatch):
    long = tmp_path / ("x" * 60)
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    server = mps.start([0], wait=5)
    try:
        assert server.folder.parent == Path("/tmp"), server.folder
        assert len(str(Path(server.env[mps.PIPE_ENV]) / "control")) < 107
    finally:
        server.stop()
    assert not server.folder.exists() and not list(long.iterdir())


def _has_cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(_has_cuda_driver(), reason="a GPU driver is installed: the probe would connect")
def test_the_client_probe_needs_the_cuda_driver():
    """The real probe, here without a GPU driver: it fails, saying what it missed, instead of hanging or passing."""
    done = subprocess.run(mps.probe_command(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "libcuda.so.1" in done.stderr, done.stderr


def test_no_control_binary_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(mps, "_DRIVER_BIN", tmp_path / "none")
    monkeypatch.setattr(mps, "SYSTEM_PIPE", tmp_path / "system-mps")
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    with pytest.raises(mps.MpsUnavailable, match="not installed"):
        mps.start([0])


def _plan(n_jobs: int):
    from sweep import study as study_mod

    return study_mod._Plan(n_jobs, n_trials=4, threads=1, slots=GpuSlots({0: 80_000.0}))


def _spec(tmp_path, tiny_model, speed: str, name: str = ""):
    from sweep.spec import load_spec
    from tests.conftest import write_spec

    folder = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}"
    folder.mkdir()
    return load_spec(write_spec(folder, tiny_model, speed=f"speed: {{{speed}}}"))


@pytest.mark.parametrize("fork", [False, True], ids=["own-processes", "forked"])
def test_workers_of_trials_sharing_a_gpu_are_clients_of_the_sweeps_server_until_it_ends(fake_mps, tmp_path,
                                                                                       tiny_model, fork):  # fmt: skip
    from sweep import study as study_mod

    plan = _plan(n_jobs=2)
    speed = f"mps: auto, fork_workers: {'on' if fork else 'off'}"
    study_mod._start_workers(_spec(tmp_path, tiny_model, speed), tmp_path / "runs", plan)
    try:
        assert plan.mps is not None
        workers = plan.pool.idle_workers()
        assert len(workers) == 2
        pipe = plan.mps.env[mps.PIPE_ENV]
        # a forked worker's environment is the request's, set after the fork (/proc shows the server's at its exec):
        # the server's holds the pipe too, and the request is the same environment a worker of its own gets
        for proc in [plan.pool.server.proc] if fork else [w.proc for w in workers]:
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            assert f"{mps.PIPE_ENV}={pipe}".encode() in environ
            assert (b"CUDA_VISIBLE_DEVICES=0" in environ) is not fork, "the server names no GPU"
        for worker in workers if fork else []:
            deadline = time.monotonic() + 60
            while ": ready at" not in worker.log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "(forked from" in worker.log.read_text() and "GPUs 0," in worker.log.read_text()
        assert mps.PIPE_ENV not in os.environ, "the sweep process itself is no client"
    finally:
        plan.end()
    assert not any(w.alive() for w in workers), "the workers end before the server is asked to quit"
    assert _calls(fake_mps)[-1] == f"quit {pipe}"
    assert not _left(tmp_path)


def test_no_server_where_no_two_processes_share_a_gpu_or_it_is_off(fake_mps, tmp_path, tiny_model):
    from sweep import study as study_mod

    cases = [(1, "mps: auto"), (2, "mps: off"), (2, "mps: auto, trials_per_worker: 2")]  # one process trains both
    for n_jobs, speed in cases:
        plan = _plan(n_jobs)
        study_mod._start_workers(_spec(tmp_path, tiny_model, speed), tmp_path / "runs", plan)
        plan.end()
        assert plan.mps is None, (n_jobs, speed)
    assert _calls(fake_mps) == [], "the daemon was never started"


def test_a_server_that_cannot_start_is_an_error_with_mps_on_and_one_that_did_is_quit_when_the_workers_fail(
    fake_mps, tmp_path, tiny_model, monkeypatch
):
    from sweep import study as study_mod
    from sweep.spec import SpecError
    from sweep.trial.pool import WorkerPool

    monkeypatch.setenv("FAKE_MPS_DAEMON_RC", "1")
    with pytest.raises(SpecError, match="speed.mps is on, but no MPS server could be started: .* -d exited 1"):
        study_mod._start_workers(_spec(tmp_path, tiny_model, "mps: on"), tmp_path / "runs", _plan(n_jobs=2))
    monkeypatch.delenv("FAKE_MPS_DAEMON_RC")

    def fail(*args, **kwargs):
        raise RuntimeError("a worker could not start")

    monkeypatch.setattr(WorkerPool, "prewarm", fail)
    plan = _plan(n_jobs=2)
    with pytest.raises(RuntimeError, match="a worker could not start"):
        study_mod._start_workers(_spec(tmp_path, tiny_model, "mps: on"), tmp_path / "runs", plan)
    assert plan.mps is not None and plan.mps.stopped
    assert _calls(fake_mps)[-1] == f"quit {plan.mps.env[mps.PIPE_ENV]}"
    assert not _left(tmp_path)


def test_daemons_left_by_sweeps_that_died_are_quit_and_a_running_sweeps_is_kept(fake_mps, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = mps.start([0], wait=5)  # started "by" a sweep that then died without quitting it
    (orphan.folder / mps.OWNER).write_text(str(dead.pid))
    orphan_pid = int((Path(orphan.env[mps.PIPE_ENV]) / "nvidia-cuda-mps-control.pid").read_text())
    foreign = tmp_path / "tmp" / f"{mps.PREFIX}noowner"  # no owner file: not ours to judge
    foreign.mkdir()
    server = mps.start([0], wait=5)  # a new sweep (this process, alive) reaps the orphan first
    try:
        assert f"quit {orphan.env[mps.PIPE_ENV]}" in _calls(fake_mps) and _gone(orphan_pid)
        assert not orphan.folder.exists() and foreign.is_dir()
        assert mps.reap_orphans(server.control) == [], "a running sweep's daemon is kept"
        assert server.folder.exists()
    finally:
        server.stop()


def test_a_pid_file_naming_another_program_is_not_killed(fake_mps, tmp_path, monkeypatch):
    server = mps.start([0], wait=5)
    bystander = subprocess.Popen(["sleep", "300"])
    pid_file = Path(server.env[mps.PIPE_ENV]) / "nvidia-cuda-mps-control.pid"
    daemon = int(pid_file.read_text())
    pid_file.write_text(str(bystander.pid))  # the pid was reused by another program
    monkeypatch.setenv("FAKE_MPS_QUIT_FAILS", "1")
    try:
        server.stop()
        assert bystander.poll() is None, "another program's process was killed"
    finally:
        bystander.kill()
        os.kill(daemon, 9)
