"""A CUDA MPS server of the sweep's own, so that trials sharing a GPU run their kernels side by side.

Without MPS a GPU runs one process's kernels at a time: trials that share it take turns, and a LoRA step at batch
1-4 leaves most of the card idle while it has it. As clients of one MPS server, the trials' kernels share the GPU's
multiprocessors. Each trial computes what it did before: the same kernels on the same inputs.

The server is private: its own pipe and log folders, passed to the sweep's workers only, quit when the sweep ends.
None is started where the user already names a server (``CUDA_MPS_PIPE_DIRECTORY``: the workers inherit theirs) or
the machine runs one (its pipes in /tmp/nvidia-mps: the workers are its clients already), where a GPU is not in the
Default compute mode, or where ``nvidia-cuda-mps-control`` is not installed. A new server is used only once a CUDA
client (a context on every GPU of the sweep) could connect to it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sweep.trial.placement import gpu_query

log = logging.getLogger("sweep")

PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
CONTROL = "nvidia-cuda-mps-control"
_DRIVER_BIN = Path("/usr/local/nvidia/bin")  # where GPU containers mount the driver's tools
SYSTEM_PIPE = Path("/tmp/nvidia-mps")  # a daemon started without CUDA_MPS_PIPE_DIRECTORY listens here

# A client of the server on every visible GPU, through the driver API alone (no torch: a fraction of a second).
# The control daemon starts the server only when the first client connects, so this is where a server that cannot
# run on these GPUs shows.
_PROBE = """
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
def check(what, rc):
    if rc:
        sys.exit(f"{what} failed with CUDA error {rc}")
check("cuInit", cuda.cuInit(0))
count = ctypes.c_int()
check("cuDeviceGetCount", cuda.cuDeviceGetCount(ctypes.byref(count)))
for i in range(count.value):
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    check("cuDeviceGet", cuda.cuDeviceGet(ctypes.byref(dev), i))
    check(f"a context on GPU {i}", cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
    cuda.cuDevicePrimaryCtxRelease(dev)
"""


class MpsUnavailable(RuntimeError):
    """Why no MPS server could be started for this sweep (``speed.mps: on`` makes it an error)."""


@dataclass
class MpsServer:
    """A running MPS control daemon and the environment that makes a process its client."""

    control: str
    folder: Path
    stopped: bool = False

    @property
    def env(self) -> dict[str, str]:
        return {PIPE_ENV: str(self.folder / "pipe"), LOG_ENV: str(self.folder / "log")}

    def ask(self, command: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
        return subprocess.run([self.control], input=command + "\n", env={**os.environ, **self.env}, text=True,
                              capture_output=True, timeout=timeout, check=False)  # fmt: skip

    def stop(self) -> None:
        """Quit the daemon (its server goes with it) and remove its folders; safe to call twice. Called once the
        workers have ended: ``quit`` waits for connected clients. A daemon that does not quit is killed."""
        if self.stopped:
            return
        self.stopped = True
        try:
            quit_ = self.ask("quit")
            if quit_.returncode != 0:
                raise OSError(f"exit code {quit_.returncode}: {(quit_.stderr or quit_.stdout)[-200:]}")
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("MPS: quitting the control daemon at %s failed (%s); killing it", self.folder, err)
            self._kill()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _kill(self) -> None:
        """SIGKILL the daemon by its pid file, only if that pid still runs the control daemon (pids are reused)."""
        try:
            pid = int((self.folder / "pipe" / "nvidia-cuda-mps-control.pid").read_text().split()[0])
            if CONTROL.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass  # no pid file (it never started) or already gone


def control_binary() -> str | None:
    found = shutil.which(CONTROL)
    if found:
        return found
    fallback = _DRIVER_BIN / CONTROL
    return str(fallback) if os.access(fallback, os.X_OK) else None


def probe_command() -> list[str]:
    return [sys.executable, "-c", _PROBE]


PREFIX = "xtuner-sweep-mps-"
OWNER = "owner.pid"  # the sweep process that started the daemon


def _base() -> str:
    """The temp folder, or /tmp where its path is too long for the Unix sockets the daemon makes in the pipe folder
    (a socket's path holds at most 107 bytes)."""
    base = tempfile.gettempdir()
    return "/tmp" if len(base) > 60 else base


def _folder() -> Path:
    """A new folder for the daemon's pipes and logs, with the pid of the sweep that owns it."""
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=_base()))
    (folder / OWNER).write_text(str(os.getpid()))
    return folder


def reap_orphans(control: str) -> list[Path]:
    """Quit the daemons of this user's sweeps that died without quitting theirs (a SIGKILLed sweep: its daemon runs
    in its own session and outlives it) and remove their folders; returns those folders."""
    reaped = []
    for folder in Path(_base()).glob(PREFIX + "*"):
        try:
            if folder.stat().st_uid != os.getuid():
                continue
            os.kill(int((folder / OWNER).read_text()), 0)
            continue  # its sweep still runs
        except ProcessLookupError:
            pass  # its sweep is gone
        except (OSError, ValueError):
            continue  # not ours to judge: no owner file, another user's sweep
        MpsServer(control, folder).stop()
        reaped.append(folder)
    if reaped:
        log.info("MPS: quit %d control daemon(s) left by sweeps that ended without quitting them", len(reaped))
    return reaped


def start(gpus: list[int], wait: float = 10.0) -> MpsServer:
    """Start a private MPS control daemon for ``gpus`` and wait until it answers; raises ``MpsUnavailable``."""
    if os.environ.get(PIPE_ENV):
        raise MpsUnavailable(f"{PIPE_ENV} is set ({os.environ[PIPE_ENV]}): the workers use that server")
    if (SYSTEM_PIPE / "control").exists():
        raise MpsUnavailable(f"an MPS control daemon of this machine listens at {SYSTEM_PIPE}: the workers use it")
    control = control_binary()
    if control is None:
        raise MpsUnavailable(f"{CONTROL} is not installed (not on PATH, not in {_DRIVER_BIN})")
    modes = gpu_query("compute_mode")  # "Default", "Exclusive_Process", "Prohibited"
    odd = {gpu: modes[gpu] for gpu in gpus if modes.get(gpu, "Default") != "Default"}
    if odd:
        raise MpsUnavailable("GPU compute mode is not Default: " + ", ".join(f"GPU {g} {m}" for g, m in odd.items()))
    reap_orphans(control)
    server = MpsServer(control, _folder())
    for name in ("pipe", "log"):
        (server.folder / name).mkdir()
    # the daemon numbers the GPUs as the driver does, like nvidia-smi and the workers' CUDA_VISIBLE_DEVICES: it must
    # not inherit the user's CUDA_VISIBLE_DEVICES (MPS would renumber them); its own session keeps a terminal's ^C off it
    daemon_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | server.env
    try:
        started = subprocess.run([control, "-d"], env=daemon_env, capture_output=True, text=True, timeout=wait,
                                 check=False, start_new_session=True)  # fmt: skip
        if started.returncode != 0:
            raise MpsUnavailable(
                f"{control} -d exited {started.returncode}: {(started.stderr or started.stdout)[-300:]}"
            )
        deadline = time.monotonic() + wait
        while server.ask("get_server_list", timeout=wait).returncode != 0:
            if time.monotonic() > deadline:
                raise MpsUnavailable(f"the MPS control daemon did not answer within {wait:.0f} s")
            time.sleep(0.1)
        env = {**os.environ, **server.env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
        probe = subprocess.run(probe_command(), env=env, capture_output=True, text=True, timeout=wait * 3, check=False)
        if probe.returncode != 0:
            raise MpsUnavailable(f"a CUDA client could not use the MPS server: {(probe.stderr or probe.stdout)[-300:]}")
        # a client that cannot reach the server may run without it: only a server the daemon lists is one in use
        if not server.ask("get_server_list", timeout=wait).stdout.split():
            raise MpsUnavailable("a CUDA client ran, but the MPS control daemon lists no server")
    except MpsUnavailable:
        server.stop()
        raise
    except (OSError, subprocess.SubprocessError) as err:
        server.stop()
        raise MpsUnavailable(str(err)) from err
    except BaseException:  # ^C while it started: no daemon is left behind
        server.stop()
        raise
    log.info("MPS: the trials on GPU %s share it through a server of this sweep's own (%s)",
             ", ".join(map(str, gpus)), server.folder)  # fmt: skip
    return server
