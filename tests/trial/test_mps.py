"""The sweep's private MPS server (sweep.trial.mps), with stand-ins for nvidia-cuda-mps-control and nvidia-smi.

The stand-in daemon keeps MPS's contract as far as the sweep relies on it: `-d` starts it (here: makes the control
socket's file in CUDA_MPS_PIPE_DIRECTORY), commands arrive on stdin, a command fails while no daemon runs there,
and `quit` ends it. Every call is recorded with the pipe folder it was made for.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from sweep.trial import mps
from sweep.trial.placement import GpuSlots

CONTROL = f"""#!{sys.executable}
import os, sys, pathlib
pipe = pathlib.Path(os.environ["CUDA_MPS_PIPE_DIRECTORY"])
record = pathlib.Path(os.environ["FAKE_MPS_RECORD"])
if sys.argv[1:] == ["-d"]:
    with record.open("a") as f:
        f.write(f"-d {{pipe}}\\n")
    if os.environ.get("FAKE_MPS_SILENT") != "1":
        (pipe / "control").write_text("")
    sys.exit(int(os.environ.get("FAKE_MPS_DAEMON_RC", "0")))
command = sys.stdin.read().strip()
with record.open("a") as f:
    f.write(f"{{command}} {{pipe}}\\n")
if not (pipe / "control").exists():
    sys.exit(1)
if command == "quit":
    (pipe / "control").unlink()
"""


@pytest.fixture
def fake_mps(tmp_path, monkeypatch):
    """The stand-ins on PATH, one Default-mode GPU per nvidia-smi line; returns the record of calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    control = bin_dir / mps.CONTROL
    control.write_text(CONTROL)
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\nprintf "0, ${FAKE_MODE0:-Default}\\n1, Default\\n"\n')
    for exe in (control, smi):
        exe.chmod(0o755)
    client = bin_dir / "client"  # a CUDA client: connects while the daemon runs, unless told to fail
    client.write_text(
        f"#!{sys.executable}\nimport os, sys, pathlib\npipe = pathlib.Path(os.environ['CUDA_MPS_PIPE_DIRECTORY'])\n"
        "with open(os.environ['FAKE_MPS_RECORD'], 'a') as f:\n"
        "    f.write(f\"client {pipe} {os.environ['CUDA_VISIBLE_DEVICES']}\\n\")\n"
        "sys.exit('no server' if os.environ.get('FAKE_MPS_CLIENT_FAILS') or not (pipe / 'control').exists() else 0)\n"
    )
    client.chmod(0o755)
    monkeypatch.setattr(mps, "probe_command", lambda: [str(client)])
    monkeypatch.setattr(mps, "SYSTEM_PIPE", tmp_path / "system-mps")
    record = tmp_path / "record.txt"
    record.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_RECORD", str(record))
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    short = tempfile.mkdtemp(prefix="mps-test-", dir="/tmp")  # pytest's own folders are too long for sockets
    (tmp_path / "tmp").symlink_to(short)
    monkeypatch.setattr(tempfile, "tempdir", short)
    yield record
    shutil.rmtree(short, ignore_errors=True)


def _left(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "tmp").glob("xtuner-sweep-mps-*"))


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


def test_a_private_server_starts_answers_and_quits_leaving_nothing(fake_mps, tmp_path):
    server = mps.start([0, 1], wait=5)
    pipe = Path(server.env[mps.PIPE_ENV])
    assert pipe.parent == server.folder and (pipe / "control").exists()
    assert Path(server.env[mps.LOG_ENV]).is_dir()
    assert len(str(pipe / "control")) < 107, "a Unix socket's path must fit sun_path"
    calls = fake_mps.read_text().splitlines()
    assert calls[:3] == [f"-d {pipe}", f"get_server_list {pipe}", f"client {pipe} 0,1"], calls
    server.stop()
    assert fake_mps.read_text().splitlines()[-1] == f"quit {pipe}"
    assert not server.folder.exists() and not _left(tmp_path)
    server.stop()  # twice: nothing left to do, no error
    assert fake_mps.read_text().splitlines()[-1] == f"quit {pipe}"


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda mp, tmp: mp.setenv(mps.PIPE_ENV, str(tmp / "theirs")), "CUDA_MPS_PIPE_DIRECTORY is set"),
        (lambda mp, tmp: mp.setenv("FAKE_MODE0", "Exclusive_Process"), "GPU 0 Exclusive_Process"),
        (lambda mp, tmp: mp.setenv("FAKE_MPS_DAEMON_RC", "3"), "-d exited 3"),
        (lambda mp, tmp: mp.setenv("FAKE_MPS_SILENT", "1"), "did not answer within 1 s"),
        (lambda mp, tmp: mp.setenv("FAKE_MPS_CLIENT_FAILS", "1"), "a CUDA client could not use the MPS server"),
        (lambda mp, tmp: (tmp / "system-mps").mkdir() or (tmp / "system-mps/control").touch(), "of this machine"),
    ],
    ids=["user-server", "compute-mode", "daemon-fails", "daemon-silent", "client-fails", "system-daemon"],
)
def test_no_server_is_left_where_one_cannot_or_must_not_start(fake_mps, tmp_path, monkeypatch, setup, reason):
    setup(monkeypatch, tmp_path)
    with pytest.raises(mps.MpsUnavailable, match=reason):
        mps.start([0], wait=1)
    assert not _left(tmp_path), "its folders are removed"


def test_the_client_probe_needs_the_cuda_driver():
    """The real probe, here without a GPU driver: it fails, saying what it missed, instead of hanging or passing."""
    import subprocess

    done = subprocess.run(mps.probe_command(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "libcuda.so.1" in done.stderr, done.stderr


def test_no_control_binary_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(mps, "_DRIVER_BIN", tmp_path / "none")
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    with pytest.raises(mps.MpsUnavailable, match="not installed"):
        mps.start([0])


def _plan(n_jobs: int):
    from sweep import study as study_mod

    return study_mod._Plan(n_jobs, n_trials=4, threads=1, slots=GpuSlots({0: 80_000.0}))


def _spec(tmp_path, tiny_model, mps_setting: str, name: str = ""):
    from sweep.spec import load_spec
    from tests.conftest import write_spec

    folder = tmp_path / f"spec-{mps_setting}{name}"
    folder.mkdir()
    return load_spec(write_spec(folder, tiny_model, speed=f"speed: {{mps: {mps_setting}}}"))


def test_workers_of_trials_sharing_a_gpu_are_clients_of_the_sweeps_server_until_it_ends(fake_mps, tmp_path,
                                                                                       tiny_model):  # fmt: skip
    from sweep import study as study_mod

    plan = _plan(n_jobs=2)
    study_mod._start_workers(_spec(tmp_path, tiny_model, "auto"), tmp_path / "runs", plan)
    try:
        assert plan.mps is not None
        workers = plan.pool.idle_workers()
        assert len(workers) == 2
        pipe = plan.mps.env[mps.PIPE_ENV]
        for worker in workers:
            environ = Path(f"/proc/{worker.proc.pid}/environ").read_bytes().split(b"\0")
            assert f"{mps.PIPE_ENV}={pipe}".encode() in environ
            assert b"CUDA_VISIBLE_DEVICES=0" in environ
        assert mps.PIPE_ENV not in os.environ, "the sweep process itself is no client"
    finally:
        plan.end()
    assert not any(w.alive() for w in workers)
    assert fake_mps.read_text().splitlines()[-1] == f"quit {pipe}"
    assert not _left(tmp_path)


def test_no_server_where_no_gpu_is_shared_or_it_is_off_and_an_error_where_it_must_run(fake_mps, tmp_path,
                                                                                     tiny_model, monkeypatch):  # fmt: skip
    from sweep import study as study_mod
    from sweep.spec import SpecError

    for n_jobs, setting in ((1, "auto"), (2, "off")):
        plan = _plan(n_jobs)
        study_mod._start_workers(_spec(tmp_path, tiny_model, setting, str(n_jobs)), tmp_path / "runs", plan)
        plan.end()
        assert plan.mps is None, (n_jobs, setting)
    assert fake_mps.read_text() == "", "the daemon was never started"
    monkeypatch.setenv("FAKE_MPS_DAEMON_RC", "1")
    plan = _plan(n_jobs=2)
    with pytest.raises(SpecError, match="speed.mps is on, but no MPS server could be started"):
        study_mod._start_workers(_spec(tmp_path, tiny_model, "on"), tmp_path / "runs", plan)
    assert plan.pool.idle_workers() == [], "the workers started for it are ended"
    assert not _left(tmp_path)
