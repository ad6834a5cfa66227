"""The launcher: the environment a training process gets, and ending several workers at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from sweep.trial import launcher

# On SIGTERM a child says so in a file, then exits only once every child has said so: ended one after another,
# the first would wait for the others' signal through its whole grace period and be killed (-9).
CHILD = textwrap.dedent(
    """
    import pathlib, signal, sys, time
    folder, me, n = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

    def stop(*_):
        (folder / f"got-{me}").touch()
        while len(list(folder.glob("got-*"))) < n:
            time.sleep(0.05)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    (folder / f"ready-{me}").touch()
    while True:
        time.sleep(1)
    """
)


def _children(folder, n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(i), str(n)], start_new_session=True)
             for i in range(n)]  # fmt: skip
    deadline = time.monotonic() + 60
    while len(list(folder.glob("ready-*"))) < n:
        assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
        assert time.monotonic() < deadline, "the children never started"
        time.sleep(0.01)
    return procs


def test_stop_groups_signals_every_process_before_waiting(tmp_path):
    procs = _children(tmp_path, 3)
    launcher.stop_groups(procs, grace=3.0)
    assert [p.returncode for p in procs] == [0, 0, 0]  # each left through its handler, none was SIGKILLed


def test_stop_group_of_one_kills_what_ignores_sigterm(tmp_path):
    procs = _children(tmp_path, 2)  # alone, the first waits for a second signal that never comes
    launcher.stop_group(procs[0], grace=0.5)
    assert procs[0].returncode == -9
    launcher.stop_group(procs[1], grace=3.0)  # the first's file is there: the second ends through its handler
    assert procs[1].returncode == 0


def test_gpu_trials_get_expandable_segments_unless_the_user_set_the_allocator(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    gpu = launcher.Launch(Path("c.py"), Path("w"), Path("l"), gpu_ids=[1])
    assert launcher.environment(gpu)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in launcher.environment(launcher.Launch(Path("c.py"), Path("w"), Path("l")))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert launcher.environment(gpu)["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
