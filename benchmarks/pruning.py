"""Does pruning pay for itself? The demo study twice, same sampler seed: with the spec's pruner and without.

    .venv/bin/python benchmarks/pruning.py [N_TRIALS]      # default 8; CPU, about 1 minute per trial
    PRUNER='{"type": "median", "n_startup_trials": 2, "n_warmup_steps": 32}' ONLY=pruned .venv/bin/python benchmarks/pruning.py 8
                                                          # another pruner setting; the unpruned run does not change

Prints, for each run, the training steps spent (iterations of every trial, and training rows seen) and the best
value reached; the goal is the pruned run within 2 % of the unpruned best with at most half the steps.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweep import study as study_mod  # noqa: E402
from sweep.spec import load_spec  # noqa: E402


def run(pruner: str, n_trials: int, folder: Path) -> dict:
    spec = load_spec(ROOT / "configs/demo.yaml")
    update = {"study": f"pruning-{pruner}", "n_trials": n_trials, "registry": None, "probes": []}
    if pruner == "none":
        update["pruner"] = spec.pruner.model_copy(update={"type": "none"})
    elif os.environ.get("PRUNER"):
        update["pruner"] = spec.pruner.model_copy(update=json.loads(os.environ["PRUNER"]))
    spec = spec.model_copy(update=update)
    opts = study_mod.RunOptions(
        storage=f"sqlite:///{folder / 'sweep.db'}", tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
        work_dir=folder / "runs", heartbeat=0,
    )  # fmt: skip
    t0 = time.monotonic()
    report = study_mod.run(spec, opts)
    wall = time.monotonic() - t0
    iters = rows = 0
    for stream in sorted((folder / "runs" / spec.study).glob("trial_*/sweep_metrics.jsonl")):
        events = [json.loads(line) for line in stream.read_text().splitlines() if line.strip()]
        train = [e for e in events if e["kind"] == "train"]
        iters += len(train)
        rows += train[-1]["step"] if train else 0
    return {"pruner": spec.pruner.model_dump(), "best": report["best"]["value"], "counts": report["counts"],
            "iterations": iters, "rows_seen": rows, "wall": wall}  # fmt: skip


def main() -> None:
    n_trials = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"pruned": ["median"], "none": ["none"]}.get(os.environ.get("ONLY", ""), ["median", "none"])
        for pruner in runs:
            folder = Path(tmp) / pruner
            folder.mkdir()
            results.append(run(pruner, n_trials, folder))
            r = results[-1]
            print(f"{json.dumps(r['pruner'])}: best {r['best']:.4f}, {r['iterations']} iterations, {r['rows_seen']} rows seen, "
                  f"{r['counts']['COMPLETE']} complete / {r['counts']['PRUNED']} pruned, {r['wall']:.0f}s", flush=True)  # fmt: skip
    failed = [f"{json.dumps(r['pruner'])}: {r['counts']['FAIL']} failed" for r in results if r["counts"].get("FAIL")]
    if failed:  # a failed trial saved its steps for a wrong reason: no comparison
        print("NO COMPARISON: trials failed (" + "; ".join(failed) + ")")
        sys.exit(1)
    if len(results) < 2:
        return
    pruned, full = results
    gap = (pruned["best"] - full["best"]) / abs(full["best"])
    print(
        f"pruned best is {gap:+.1%} from the unpruned best (goal: within 2 %), with "
        f"{pruned['iterations'] / full['iterations']:.0%} of the iterations (goal: at most 50 %)"
    )


if __name__ == "__main__":
    main()
