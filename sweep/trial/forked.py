"""The sweep's side of the fork server (``sweep.training.forkserver``): workers forked from one process that imported
the training stack once, each behind the interface of a ``subprocess.Popen`` the pool already uses.

A request is answered after the server's imports (seconds), so ``ForkServer.spawn`` returns at once: the job lines
the pool writes wait in the worker's stdin pipe, and the worker's pid arrives with the server's answer. Where the
server cannot fork (it found CUDA initialized after its imports, or it died), each waiting request becomes a worker
process of its own, with the same stdin pipe and output: the jobs already written reach it all the same.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from sweep.trial import protocol

log = logging.getLogger("sweep")

#: Starts a worker as a process of its own from its stdin and output descriptors (the server cannot fork).
Fallback = Callable[[int, int], subprocess.Popen]


class ForkedProcess:
    """A worker the fork server forks: ``poll``, ``wait``, ``returncode``, ``pid`` and ``stdin`` as a Popen's."""

    def __init__(self, server: ForkServer, stdin: IO[bytes], fds: tuple[int, int], fallback: Fallback) -> None:
        self._server = server
        self.stdin = stdin
        self._fds: tuple[int, int] | None = fds  # the worker's stdin and output, held until it is forked
        self._fallback = fallback
        self._own: subprocess.Popen | None = None  # the worker as a process of its own, where the server cannot fork
        self.pid: int | None = None
        self._rc: int | None = None
        self._cancelled = False  # ended before it was forked: killed as soon as its pid arrives

    # called by the server's reader thread, with the server's condition held
    def _forked(self, pid: int) -> None:
        self.pid = pid
        self._close_fds()
        if self._cancelled:
            _signal_group(pid, signal.SIGKILL)

    def _exited(self, rc: int) -> None:
        if self._rc is None:
            self._rc = rc

    def _on_its_own(self, why: str) -> None:
        """The server cannot fork it: start it as a process of its own (unless it was ended already)."""
        if self._fds is None or self._own is not None:
            return
        if self._cancelled:
            self._close_fds()
            return
        try:
            self._own = self._fallback(*self._fds)
            self.pid = self._own.pid
        except OSError as err:
            log.error("a training worker could not start (%s; %s)", err, why)
            self._rc = 1
        self._close_fds()

    def _close_fds(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None

    @property
    def returncode(self) -> int | None:
        return self.poll() if self._rc is None else self._rc

    def poll(self) -> int | None:
        with self._server.cond:
            if self._own is not None:
                return self._own.poll()
            if self._rc is None and self.pid is not None and self._server.gone and not _exists(self.pid):
                self._rc = -signal.SIGKILL  # its server died, and with it (parent-death signal) the worker
            return self._rc

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (rc := self.poll()) is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired("forked worker", timeout or 0.0)
            with self._server.cond:
                self._server.cond.wait(timeout=0.1 if left is None else min(0.1, left))
        return rc

    def signal_group(self, sig: int) -> None:
        """``killpg`` the worker's group; one not forked yet is ended now, and killed when its pid arrives."""
        with self._server.cond:
            if self._own is None and self.pid is None:
                self._cancelled = True
                if self._rc is None:
                    self._rc = -sig
                with contextlib.suppress(OSError):
                    self.stdin.close()  # a fork that slips through finds no job, and ends
                return
            pid = self.pid
        _signal_group(pid, sig)


def _signal_group(pid: int, sig: int) -> None:
    """``killpg``, or ``kill`` for a fork that has not left the server's group yet (``setsid`` is its first act)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    except PermissionError:
        pass


def _exists(pid: int) -> bool:
    """Alive: a zombie is not (a sweep that is PID 1 inherits the orphaned forks and never reaps them)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class ForkServer:
    """Starts the fork server and turns ``spawn`` calls into its workers. Thread-safe."""

    def __init__(self, env: dict[str, str], log_path: Path, python: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [python, "-m", protocol.FORKSERVER_MODULE, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**env, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"},
                start_new_session=True,
            )
        theirs.close()
        self._sock = ours
        self.cond = threading.Condition()
        self._refs = itertools.count(1)
        self._waiting: dict[int, ForkedProcess] = {}  # by request ref: asked, not forked yet
        self._forked: dict[int, ForkedProcess] = {}  # by pid
        self.gone = False  # no more forks: unsafe, dead or closed
        self.reason = ""
        threading.Thread(target=self._read, daemon=True, name="fork-server").start()

    def spawn(self, env: dict[str, str], output: int, fallback: Fallback) -> ForkedProcess:
        """A worker with ``env`` and its output on descriptor ``output`` (duplicated: the caller keeps its own)."""
        stdin_r, stdin_w = os.pipe()
        proc = ForkedProcess(self, os.fdopen(stdin_w, "wb"), (stdin_r, os.dup(output)), fallback)
        with self.cond:
            ref = next(self._refs)
            self._waiting[ref] = proc
            if not self.gone:
                try:
                    socket.send_fds(self._sock, [protocol.Fork(ref, env).to_bytes()], list(proc._fds))
                    return proc
                except ConnectionError as err:
                    self._end(f"the fork server is gone ({err})")
                except OSError as err:  # this request could not be sent (too large): it alone starts on its own
                    log.warning("a worker starts as a process of its own: its fork request failed (%s)", err)
                    self._waiting.pop(ref, None)
                    proc._on_its_own(str(err))
                    return proc
            self._waiting.pop(ref, None)
            proc._on_its_own(self.reason)
        return proc

    def _read(self) -> None:
        while True:
            try:
                raw = self._sock.recv(protocol.FORK_MESSAGE_MAX)
            except OSError:
                raw = b""
            if not raw:
                with self.cond:
                    self._end(f"the fork server ended (exit code {self.proc.poll()}; its log: {self.log_path})")
                return
            with self.cond:
                try:
                    self._handle(protocol.ForkNews.from_bytes(raw))
                except Exception as err:  # noqa: BLE001 - a reader that dies silently would leave every poll at None
                    log.error("the fork server's answer could not be handled (%s): no more forks", err)
                    self._end(f"its answer could not be handled ({err})")
                    return
                self.cond.notify_all()

    def _handle(self, news: protocol.ForkNews) -> None:
        """One answer of the server (called with ``cond`` held)."""
        if news.kind == "unsafe":  # "ready" needs nothing: requests were queued in the socket meanwhile
            log.warning("workers start as processes of their own, not forked: %s", news.reason)
            self._end(news.reason)
        elif news.kind == "refused" and news.ref in self._waiting:
            log.warning("a worker starts as a process of its own: %s", news.reason)
            self._waiting.pop(news.ref)._on_its_own(news.reason)
        elif news.kind == "forked" and news.ref in self._waiting:
            proc = self._waiting.pop(news.ref)
            self._forked[news.pid] = proc
            proc._forked(news.pid)
        elif news.kind == "exited":
            proc = self._forked.pop(news.pid, None) or self._waiting.pop(news.ref, None)
            if proc is not None:
                proc._exited(news.rc)

    def _end(self, why: str) -> None:
        """No more forks (called with ``cond`` held): every waiting request starts as a process of its own."""
        if self.gone:
            return
        self.gone, self.reason = True, why
        waiting, self._waiting = list(self._waiting.values()), {}
        for proc in waiting:
            proc._on_its_own(why)
        self.cond.notify_all()

    def close(self, grace: float = 10.0) -> None:
        """End the server (its workers are ended first, by the pool): closing our end ends its loop. A request it
        has not answered yet is not started at all."""
        with self.cond:
            self.gone, self.reason = True, self.reason or "closed"
            for proc in self._waiting.values():
                proc.signal_group(signal.SIGKILL)
                proc._close_fds()
            self._waiting = {}
            self.cond.notify_all()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._sock.close()
