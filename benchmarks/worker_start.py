"""How long N resident workers take to be ready, forked from the fork server against each importing on its own.

    python benchmarks/worker_start.py [--workers 4] [--rounds 2] [--gpus 0]

Each round starts a ``WorkerPool`` of N workers (as `sweep run` does ahead of its first trial, on GPU 0 with
``--gpus 0`` or the CPU), waits for every worker's "ready at" line and prints the seconds from the pool's start to each,
the CPU seconds the workers and the server spent, then ends them. Sides alternate: own processes, then forked.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweep.trial.pool import WorkerPool  # noqa: E402


def _round(n: int, fork: bool, gpus: list[int], folder: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    pool = WorkerPool(folder, fork=fork)
    pool.prewarm(n, gpus, None if gpus else 1)
    deadline = time.monotonic() + 300
    ready: list[float] = []
    try:
        while time.monotonic() < deadline:
            texts = [log.read_text(errors="replace") for log in folder.glob("worker-*.log")]
            found = [re.search(r": ready at ([0-9.]+)", text) for text in texts]
            if len(texts) == n and all(found):
                ready = sorted(float(m.group(1)) - started for m in found if m)
                forked = sum("(forked from" in text for text in texts)
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"not all {n} workers were ready after 300 s; logs in {folder}")
    finally:
        pool.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"ready": ready, "forked": forked, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gpus", type=str, default="", help="comma-separated GPU indices (default: the CPU)")
    args = parser.parse_args()
    gpus = [int(g) for g in args.gpus.split(",") if g]
    print(f"{args.workers} workers, {'GPUs ' + args.gpus if gpus else 'CPU'}, {os.cpu_count()} CPUs", flush=True)
    for round_ in range(args.rounds):
        for fork in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                r = _round(args.workers, fork, gpus, Path(tmp))
            side = "forked     " if fork else "own process"
            print(f"round {round_ + 1} {side}: ready at {', '.join(f'{x:.1f}' for x in r['ready'])} s "
                  f"({r['forked']} forked); CPU {r['cpu']:.1f} s in the workers and server", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
