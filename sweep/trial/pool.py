"""Resident trial workers: one training process per GPU slot (or CPU lane) that trains trial after trial.

Started on first need, a worker keeps the base model loaded between trials (``sweep.training.worker``),
so a trial after the first pays only for its own LoRA layers and steps. A worker serves one
``CUDA_VISIBLE_DEVICES`` set and thread count; a trial that spans GPUs (torchrun, DeepSpeed) still
starts a fresh process. An idle worker holds its base model on its GPU;
when a GPU's trials need that memory, idle workers there are ended first.

With ``at_once`` above 1 (``speed.trials_per_worker``) a worker takes up to that many trials at once, over
one copy of the base model with their steps joined (``sweep.training.cotrain``): a trial placed on a GPU
goes to the worker there that already trains others, while it has room. A failed job makes its worker
take no more; the worker ends when the jobs beside it are done. Stopping one job ends its worker, and
with it the jobs beside it.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sweep.trial import launcher, protocol
from sweep.trial.forked import ForkServer
from sweep.trial.placement import GpuSlots

log = logging.getLogger("sweep")
_SPAWNED = itertools.count(1)


@dataclass
class Worker:
    proc: subprocess.Popen
    gpus: tuple[int, ...]
    threads: int | None
    log: Path | None = None  # its own output, outside jobs: startup, and a death between or before jobs
    jobs: int = 0  # jobs handed to it: one that never had one holds no model and no CUDA context yet
    running: int = 0  # jobs it trains now
    draining: bool = False  # a job of it failed: it takes no more, and ends once the running ones are done

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, grace: float = 10.0) -> None:
        kill_all([self], grace)


def kill_all(workers: list[Worker], grace: float = 10.0) -> None:
    """End the workers together (one grace period, their CUDA teardowns side by side) and close their pipes."""
    launcher.stop_groups([w.proc for w in workers], grace)
    for worker in workers:
        if worker.proc.stdin:
            worker.proc.stdin.close()


class WorkerPool:
    """Hands trials to idle workers with the same devices, starting workers as needed. Thread-safe."""

    def __init__(self, folder: Path, slots: GpuSlots | None = None, idle_mb: float = 0.0, at_once: int = 1,
                 fork: bool = False) -> None:  # fmt: skip
        self.folder = folder
        self.slots = slots
        self.idle_mb = idle_mb  # GPU memory an idle worker holds: its base model and CUDA context
        self.at_once = at_once  # jobs one worker trains at once
        self.fork = fork  # workers forked from one server that imported the training stack (sweep.trial.forked)
        self.server: ForkServer | None = None
        self._server_lock = threading.Lock()
        self.env: dict[str, str] = {}  # more environment for the workers (an MPS server's pipe folder)
        self._workers: list[Worker] = []
        self._logs: list[Path] = []  # every worker's own log, for ``discard``
        self._made = _first_missing(folder)  # the outermost folder the workers' logs will create, for ``discard``
        self._lock = threading.Lock()

    def start(self, launch: launcher.Launch) -> launcher.Started:
        """Begin training ``launch``: in an idle worker, a new one, or (multi-GPU, DeepSpeed) a fresh process."""
        if launch.n_gpus > 1:
            return launcher.Running(launch)
        return Job(self, self._place(launch), launch)

    def _place(self, launch: launcher.Launch) -> Worker:
        """The worker that trains ``launch`` (counted as running it): one with room, else a new one."""
        gpus = tuple(launch.gpu_ids)
        with self._lock:
            self._workers = [w for w in self._workers if w.running or w.alive()]  # a dead idle one is not handed out
            worker = self._with_room(launch)
            leaving = self._make_room(gpus)
        for idle in leaving:
            log.info("ending idle worker %s on GPU %d: its memory is needed", idle.proc.pid, gpus[0])
        kill_all(leaving)  # outside the lock: ending them may take their grace period
        if worker is None:
            with self._lock:  # looked for again and started under the lock: two trials at once start one worker
                worker = self._with_room(launch)
                if worker is None:
                    worker = self._spawn(launch)
                    worker.running = 1
                    self._workers.append(worker)
        return worker

    def _with_room(self, launch: launcher.Launch) -> Worker | None:
        """A live worker for these devices with room for one more job, counted as running it. Called with the lock held."""
        fits = [w for w in self._workers if w.gpus == tuple(launch.gpu_ids) and w.threads == launch.threads
                and w.running < self.at_once and not w.draining and w.alive()]  # fmt: skip
        # one that trains others now (its steps join theirs), else one that holds the model
        worker = max(fits, key=lambda w: (w.running > 0, w.jobs > 0), default=None)
        if worker is not None:
            worker.running += 1
        return worker

    def idle_workers(self) -> list[Worker]:
        """The workers that train nothing now."""
        with self._lock:
            return [w for w in self._workers if not w.running]

    def prewarm(self, n: int, gpus: list[int], threads: int | None) -> None:
        """Start ``n`` workers now, one GPU after another, idle until their first job.

        A worker's cold start (imports, CUDA) then runs while the sweep prepares its data, its MLflow runs
        and its first configs, instead of after the first trial's slot (docs/benchmarks.md measures both).
        A worker whose GPU no trial is placed on stays idle and is ended by ``_make_room`` or ``close``.
        """
        for i in range(n):
            gpu_ids = [gpus[i % len(gpus)]] if gpus else []
            launch = launcher.Launch(Path(), self.folder, self.folder / "prewarm.log", gpu_ids=gpu_ids, threads=threads)
            worker = self._spawn(launch)
            with self._lock:
                self._workers.append(worker)
        if n:
            log.info("started %d training worker(s) ahead of the first trial%s", n,
                     f" on GPU {', '.join(map(str, sorted(set(gpus))))}" if gpus else "")  # fmt: skip

    def _make_room(self, gpus: tuple[int, ...]) -> list[Worker]:
        """The idle workers on this trial's GPU to end (taken off the idle list): as many as needed for
        them and the running trials to fit. Called with the lock held."""
        if self.slots is None or len(gpus) != 1:
            return []
        # idle ones that had jobs (one started ahead and never used holds nothing)
        others = [w for w in self._workers if w.gpus == gpus and w.jobs and not w.running]
        leaving = []
        while others and self.slots.room(gpus[0]) < len(others) * self.idle_mb:
            worker = others.pop()
            self._workers.remove(worker)
            leaving.append(worker)
        return leaving

    def _spawn(self, launch: launcher.Launch) -> Worker:
        self.folder.mkdir(parents=True, exist_ok=True)
        # this process's n-th; made exclusively, as sweeps in other containers may share the PID and the folder
        fd, name = tempfile.mkstemp(dir=self.folder, prefix=f"worker-{os.getpid()}-{next(_SPAWNED)}-", suffix=".log")
        path, out = Path(name), os.fdopen(fd, "ab")
        env = self._environment(launch)

        def own_process(stdin: int, output: int) -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, "-m", protocol.WORKER_MODULE],
                stdin=stdin,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                # no PR_SET_PDEATHSIG here: it fires when the spawning *thread* ends, and an Optuna n_jobs
                # thread ends while other threads' trials still use its worker (seen on the H200: exit -15).
                # The worker watches its parent process itself (sweep.training.worker).
            )

        try:
            if self.fork:
                proc = self._fork_server(launch).spawn(env, out.fileno(), own_process)
            else:
                proc = own_process(subprocess.PIPE, out.fileno())
        finally:
            out.close()  # the worker holds its own copy
        self._logs.append(path)
        return Worker(proc, tuple(launch.gpu_ids), launch.threads, path)

    def _fork_server(self, launch: launcher.Launch) -> ForkServer:
        """The server the workers are forked from, started with the first: the environment they share, no GPU named
        (each fork names its own before it initializes CUDA)."""
        with self._server_lock:
            if self.server is None:
                self.server = self._start_server(launch)
            return self.server

    def _start_server(self, launch: launcher.Launch) -> ForkServer:
        fd, name = tempfile.mkstemp(dir=self.folder, prefix=f"forkserver-{os.getpid()}-", suffix=".log")
        os.close(fd)
        self._logs.append(Path(name))
        shared = launcher.Launch(Path(), self.folder, Path(name), gpu_ids=[], threads=launch.threads)
        return ForkServer(self._environment(shared), Path(name), sys.executable)

    def _environment(self, launch: launcher.Launch) -> dict[str, str]:
        """A worker's environment (and, with no GPU named, its fork server's: they differ only in per-worker keys)."""
        return launcher.environment(launch) | self.env | {protocol.JOBS_AT_ONCE_ENV: str(self.at_once)}

    def _returned(self, worker: Worker, reusable: bool) -> None:
        """A job of ``worker`` ended; unless it ended well, the worker takes no more and ends when it is free."""
        with self._lock:
            worker.running = max(0, worker.running - 1)
            worker.draining |= not reusable
            if worker.running and worker.alive() and not launcher.STOP.is_set():
                return  # jobs beside it still train
            if not worker.draining and worker.alive() and not launcher.STOP.is_set():
                return  # idle, holding its model for the next job
            if worker in self._workers:
                self._workers.remove(worker)
        worker.kill()

    def close(self) -> None:
        """End every worker (idle or not), then the server they were forked from: the sweep is done or stopping."""
        with self._lock:
            workers, self._workers = self._workers, []
            server, self.server = self.server, None
        kill_all(workers)
        if server is not None:
            server.close()

    def discard(self) -> None:
        """End every worker and remove their logs: the run was refused before any trial (bad input leaves nothing).

        The folders made for the logs go too, each only if empty: other `sweep run`s sharing the work dir (one study
        over many machines) may have written there meanwhile."""
        self.close()
        for path in self._logs:
            path.unlink(missing_ok=True)
        if self._made is None:
            return
        for folder in (self.folder, *self.folder.parents):
            try:
                folder.rmdir()
            except OSError:
                return  # not empty, or gone
            if folder == self._made:
                return


def _first_missing(path: Path) -> Path | None:
    """The outermost folder on the way to ``path`` that does not exist yet (None: ``path`` exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


class Job:
    """One trial's training in a resident worker; the same interface as ``launcher.Running``."""

    def __init__(self, pool: WorkerPool, worker: Worker, launch: launcher.Launch) -> None:
        self.pool, self.worker, self.launch = pool, worker, launch
        self.log = launch.log
        launch.log.parent.mkdir(parents=True, exist_ok=True)
        self.done = launch.work_dir / protocol.DONE_FILE
        self.rc: int | None = None
        self._send()

    def _send(self) -> None:
        self.done.unlink(missing_ok=True)
        job = protocol.Job(launcher.train_args(self.launch), str(self.launch.log), str(self.done))
        self.worker.jobs += 1
        try:
            self.worker.proc.stdin.write(job.to_line())
            self.worker.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker is gone; poll() reports its exit code

    def _result(self) -> int | None:
        done = protocol.Done.read(self.done)
        return int(done.rc) if done is not None else None

    def poll(self) -> int | None:
        if self.rc is None:
            self.rc = self._result()
        if self.rc == protocol.NOT_STARTED:  # sent to a worker whose other job had just failed: another worker
            self.pool._returned(self.worker, reusable=False)
            self.worker = self.pool._place(self.launch)
            self.rc = None
            self._send()
            return None
        if self.rc is None and not self.worker.alive():
            # it died in the job (killed, out of host memory): its own exit code, unless it wrote one first
            self.rc = self._result()
            if self.rc is None:
                self.rc = self.worker.proc.returncode or 1
                self._note_death()
        return self.rc

    def _note_death(self) -> None:
        """A worker that died before or during the job may have said why only in its own log:
        put its end in the job's log, which is what the trial shows as its error."""
        tail = launcher.log_tail(self.worker.log) if self.worker.log else ""
        with self.log.open("a", encoding="utf-8") as f:
            f.write(
                f"\nresident worker {self.worker.proc.pid} exited with code {self.worker.proc.returncode}"
                f" before finishing this job; the end of its log ({self.worker.log}):\n{tail}\n"
            )

    def stop(self, grace: float = 10.0) -> int:
        """Stopping a trial mid-job ends its worker (and the jobs beside it): the next trial gets a fresh one."""
        self.pool._returned(self.worker, reusable=False)
        self.worker.kill(grace)
        if self.rc is None:
            self.rc = self._result()
        if self.rc is None:
            self.rc = self.worker.proc.returncode or 1
        return self.rc

    def wait(self) -> int:
        while self.poll() is None:
            time.sleep(0.1)
        self.pool._returned(self.worker, reusable=self.rc == 0)
        return self.rc
