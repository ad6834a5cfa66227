"""One process per sweep that imports the training stack once and forks the resident workers from it.

A worker's imports take 8-16 s (docs/benchmarks.md); workers started side by side each paid them, and one started
later (after a failed job, or after an idle one was ended for memory) paid them again. Forked from this server,
a worker starts with everything imported and only initializes its own GPU. The sweep's side
(``sweep.trial.forked``) sends ``protocol.Fork`` requests with two descriptors (the worker's stdin and output);
the server answers with ``protocol.ForkNews``.

A fork can use a GPU only if its parent never initialized CUDA. Torch's device checks are asked through NVML
(``PYTORCH_NVML_BASED_CUDA_CHECK``, set by the sweep), and bitsandbytes' import-time question for the GPUs'
compute capability is answered from NVML too (``_capability_from_nvml``); if CUDA is initialized all the same,
the server says ``unsafe`` and ends, and the sweep starts its workers as processes of their own.
The server stays single-threaded but for the parent watch, so a fork inherits no lock held by another thread.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator

from sweep.trial import protocol

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_PR_SET_PDEATHSIG = 1

#: The server's environment as it started, before its imports (which read it, and may add to it).
STARTED_WITH: dict[str, str] = {}


def _nvml_capabilities() -> list[tuple[int, int]] | None:
    """Every GPU's compute capability as NVML reports it (no CUDA context), or None where NVML cannot answer."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        found = []
        for index in range(count.value):
            handle, major, minor = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                return None
            if nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0:
                return None
            found.append((major.value, minor.value))
        return found
    finally:
        nvml.nvmlShutdown()


@contextlib.contextmanager
def _capability_from_nvml(seen: dict[str, str] | None = None) -> Iterator[None]:
    """While the server imports, ``torch.cuda.get_device_capability`` answers from NVML instead of a CUDA context.

    bitsandbytes asks it at import time (to pick its library by the highest capability; every index gets the
    machine's highest here). Where NVML cannot answer, torch's own function runs, and ``unsafe`` follows. ``seen``
    gets what NVML answered and where CUDA was first initialized (torch's ``_lazy_init``), for the ``unsafe`` reason.
    """
    import torch

    seen = {} if seen is None else seen
    capabilities = _nvml_capabilities()
    seen["nvml"] = f"NVML answered compute capabilities {capabilities}" if capabilities else "NVML could not answer"
    original, lazy_init = torch.cuda.get_device_capability, torch.cuda._lazy_init
    if capabilities:
        torch.cuda.get_device_capability = lambda device=None: max(capabilities)

    def recorded_lazy_init() -> None:
        if "cuda_init" not in seen:
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            seen["cuda_init"] = " <- ".join(f"{f.filename}:{f.lineno} {f.name}" for f in reversed(frames[-6:]))
        lazy_init()

    torch.cuda._lazy_init = recorded_lazy_init
    try:
        yield
    finally:
        torch.cuda.get_device_capability, torch.cuda._lazy_init = original, lazy_init


def _send(sock: socket.socket, news: protocol.ForkNews) -> None:
    with contextlib.suppress(OSError):  # the sweep is gone: the loop ends at its next read
        sock.send(news.to_bytes())


def _reap(sock: socket.socket) -> None:
    """Tell the sweep about every worker that ended since the last look."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, protocol.ForkNews("exited", pid=pid, rc=os.waitstatus_to_exitcode(status)))


def _become_worker(sock: socket.socket, request: protocol.Fork, fds: list[int], server: int) -> None:
    """In the fork: take the sweep's descriptors and environment, leave the server's group, serve jobs; never return.

    It dies with the server (the parent-death signal, then a check that the server had not died already): a fork whose
    server died before saying "forked" is started again by the sweep as a process of its own, on the same stdin.
    """
    code = 1
    try:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != server:
            os._exit(1)
        sock.close()
        os.setsid()  # a group of its own, as a spawned worker leads: the sweep ends it with killpg
        stdin, output = fds
        os.dup2(stdin, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(stdin)
        os.close(output)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        differs = sorted(k for k in (set(request.env) | set(STARTED_WITH)) - protocol.FORK_PER_WORKER_ENV
                         if request.env.get(k) != STARTED_WITH.get(k))  # fmt: skip
        if differs:  # what the server imported read other values: a fresh worker, in this very process
            print(f"worker {os.getpid()}: its environment differs from the fork server's in {', '.join(differs)}:"
                  " started afresh, not forked", flush=True)  # fmt: skip
            os.execve(sys.executable, [sys.executable, "-m", protocol.WORKER_MODULE], request.env)
        set_by_imports = {k: v for k, v in os.environ.items() if STARTED_WITH.get(k) != v}  # as the worker's own would
        os.environ.clear()
        os.environ.update(request.env | set_by_imports)  # putenv too: CUDA reads CUDA_VISIBLE_DEVICES at its start
        threads = request.env.get("OMP_NUM_THREADS", "")
        if threads.isdigit():  # the thread pool was sized by the server's environment when torch loaded
            import torch

            torch.set_num_threads(int(threads))
        from sweep.training import worker

        worker.FORKED_FROM = os.getppid()
        worker.main([])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the worker's failure is its exit code, said in its log
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()  # the handlers a worker of its own runs at its end (logging's flush, ...)
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _serve(sock: socket.socket) -> None:
    """Fork a worker for each request until the sweep closes its end."""
    while True:
        ready, _, _ = select.select([sock], [], [], 0.1)
        _reap(sock)
        if not ready:
            continue
        raw, fds, _flags, _addr = socket.recv_fds(sock, protocol.FORK_MESSAGE_MAX, 2)
        if not raw:
            return  # the sweep closed its end: it is done, or gone
        request = protocol.Fork.from_bytes(raw)
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            _send(sock, protocol.ForkNews("exited", ref=request.ref, rc=1, reason=f"{len(fds)} descriptors, not 2"))
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        server = os.getpid()
        try:
            pid = os.fork()
        except OSError as err:  # a process limit, or memory: this request starts on its own; the forks stay
            pid = -1
            _send(sock, protocol.ForkNews("refused", ref=request.ref, reason=f"fork failed: {err}"))
        if pid == 0:
            _become_worker(sock, request, fds, server)
        for fd in fds:
            os.close(fd)
        if pid > 0:
            _send(sock, protocol.ForkNews("forked", ref=request.ref, pid=pid))


def import_training_stack(seen: dict[str, str]) -> None:
    """Everything a worker imports, every import inside ``_capability_from_nvml``: even importing the worker module
    imports bitsandbytes (the first H100 run imported it before the NVML answer was in place, and CUDA started)."""
    with _capability_from_nvml(seen):
        from sweep.training import patches, worker

        worker.exit_when_orphaned()
        patches.prepare_process()


def main(argv: list[str]) -> None:
    STARTED_WITH.update(os.environ)
    sock = socket.socket(fileno=int(argv[0]))
    started = time.monotonic()
    seen: dict[str, str] = {}
    import_training_stack(seen)
    import torch

    if torch.cuda.is_initialized():
        where = seen.get("cuda_init", "not through torch.cuda._lazy_init")
        reason = f"importing the training stack initialized CUDA (first at {where}; {seen['nvml']})"
        print(f"fork server {os.getpid()}: {reason}", flush=True)
        _send(sock, protocol.ForkNews("unsafe", reason=reason))
        return
    now = time.time()
    print(f"fork server {os.getpid()}: ready at {now:.3f} (imports {time.monotonic() - started:.1f} s)", flush=True)
    _send(sock, protocol.ForkNews("ready", pid=os.getpid()))
    _serve(sock)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Exception:  # noqa: BLE001 - said in the server's log; the sweep sees its socket close
        traceback.print_exc()
        sys.exit(1)
