"""Where a sweep's start goes before its first trial can train: the imports of a training worker and the sweep's own
checks, each alone and all at once as `sweep run` starts them (N workers beside the checks).

    python benchmarks/start_profile.py SPEC [--workers 5]

Prints seconds for: a worker's `patches.prepare_process` (everything it imports before it says "ready"); the
sweep's `preflight.check` of SPEC, split into the imports it triggers and the rest; then both again with N workers
and the check started at once; and the modules that took longest to import in the check (`-X importtime`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = "from sweep.training import patches; patches.prepare_process()"
CHECK = (
    "import sys; from sweep.lean_imports import skip_unused_frameworks; skip_unused_frameworks(); "  # as `sweep` does
    "from sweep.spec import load_spec; from sweep.preflight import check; check(load_spec(sys.argv[1]))"
)


def _timed(code: str, *args: str, importtime: bool = False) -> subprocess.Popen:
    wrapped = f"import time, json; t0 = time.time(); exec({code!r}); print(json.dumps(time.time() - t0))"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.Popen([sys.executable, *flags, "-c", wrapped, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _seconds(proc: subprocess.Popen) -> tuple[float, str]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}):\n{err[-2000:]}")
    return float(out.strip().splitlines()[-1]), err


def _slowest(importtime: str, n: int = 12) -> list[tuple[float, str]]:
    """The top-level imports (those nobody else imported) with their cumulative seconds."""
    rows = []
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if cumulative.strip().isdigit() and not name.startswith("  "):  # one space, then the name: top level
            rows.append((int(cumulative) / 1e6, name.strip()))
    return sorted(rows, reverse=True)[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--workers", type=int, default=5)
    args = parser.parse_args()
    figures: dict[str, object] = {}
    figures["worker_alone"], _ = _seconds(_timed(WORKER))
    figures["check_alone"], importtime = _seconds(_timed(CHECK, str(args.spec), importtime=True))
    slowest = _slowest(importtime)
    figures["check_imports"] = round(sum(s for s, _ in _slowest(importtime, 10_000)), 2)
    started = time.time()
    procs = [_timed(WORKER) for _ in range(args.workers)]
    check = _timed(CHECK, str(args.spec))
    figures["together_workers"] = [round(_seconds(p)[0], 2) for p in procs]
    figures["together_check"] = round(_seconds(check)[0], 2)
    figures["together_wall"] = round(time.time() - started, 2)
    print(json.dumps(figures))
    print(f"a worker's imports alone {figures['worker_alone']:.1f}s; the checks alone {figures['check_alone']:.1f}s, "
          f"{figures['check_imports']:.1f}s of it importing")  # fmt: skip
    print(f"{args.workers} workers and the checks at once: workers {figures['together_workers']} s, checks "
          f"{figures['together_check']} s")  # fmt: skip
    print("the checks' slowest top-level imports:", ", ".join(f"{name} {s:.1f}s" for s, name in slowest))


if __name__ == "__main__":
    main()
