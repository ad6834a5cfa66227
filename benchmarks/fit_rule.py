"""Which checkpoint should a trial keep? Each keep rule (``objective.keep``) against the test split, on the demo.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/fit_rule.py [SEEDS...]    # default 0 1 2; CPU, ~10 min per seed

The demo study (configs/demo.yaml, tiny local model) runs once per seed (data split, sampler and training seed),
with the hook saving the adapter of every validation point (``protocol.SAVE_POINTS_ENV``). Each rule is then
replayed over the same trials' validation points (with their standard errors), and the adapters it keeps and
every trial's last one are scored on the test split. Printed per rule: how often the kept checkpoint's test/loss
is no worse than the last checkpoint's (a rule that keeps the last point ties with it by construction, so the mean
test/loss of the kept checkpoints is printed too), and how far the champion's (the complete trial with the best kept value)
test/loss is from the lowest test/loss of any complete trial's kept checkpoint. The same trials serve every rule;
in a real sweep the sampler would see each rule's values and propose other trials after its startup ones.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from objectives.noise import se_name  # noqa: E402
from objectives.selection import KEEP_RULES, Point, kept_point  # noqa: E402
from sweep import study as study_mod  # noqa: E402
from sweep.registry.gate import _score  # noqa: E402
from sweep.spec import load_spec  # noqa: E402
from sweep.trial import protocol  # noqa: E402

OUT = ROOT / ".cache" / "bench_fit_rule"


def run_seed(seed: int, folder: Path) -> list[dict]:
    """The demo study with this seed; for every finished trial, its points and the test/loss of each kept one."""
    spec = load_spec(ROOT / "configs/demo.yaml")
    spec = spec.model_copy(update={
        "study": f"fit-rule-{seed}", "registry": None, "probes": [], "seed": seed,
        "data": spec.data.model_copy(update={"seed": seed}),
        "sampler": spec.sampler.model_copy(update={"seed": seed}),
        "objective": spec.objective.model_copy(update={"keep": "best"}),  # today's rule drives the sampler
    })  # fmt: skip
    opts = study_mod.RunOptions(storage=f"sqlite:///{folder / 'sweep.db'}",
                                tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", work_dir=folder / "runs",
                                heartbeat=0)  # fmt: skip
    os.environ[protocol.SAVE_POINTS_ENV] = "1"
    study_mod.run(spec, opts)
    study = optuna.load_study(study_name=spec.study, storage=opts.storage)
    metric, direction = spec.objective.primary, spec.objective.primary_direction
    test_file = next((folder / "runs").glob("**/test.jsonl"))
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            continue
        work = Path(t.user_attrs["work_dir"])
        vals = [e for e in protocol.read_events(work / protocol.STREAM_FILE) if isinstance(e, protocol.Val)]
        points = [Point(e.step, e.metrics[metric], e.metrics.get(se_name(metric), float("nan")))
                  for e in vals if metric in e.metrics]  # fmt: skip
        kept = {rule: kept_point(points, direction, rule) for rule in KEEP_RULES}
        steps = {p.step for p in kept.values() if p is not None} | {points[-1].step}
        config = work / protocol.ADAPTER_DIR / "xtuner_config.py"  # the rendered config, as the gate reads it
        test = {s: _score(spec, protocol.point_adapter(work, s), config, test_file)["test/loss"] for s in sorted(steps)}
        trials.append({
            "number": t.number, "state": t.state.name, "last_step": points[-1].step,
            "points": [[p.step, p.value, p.se] for p in points],
            "kept": {r: {"step": p.step, "value": p.value, "se": p.se} for r, p in kept.items() if p is not None},
            "test_loss": {str(s): v for s, v in test.items()},
        })  # fmt: skip
        print(f"seed {seed} trial {t.number} ({t.state.name}): test/loss by step {test}; kept "
              + ", ".join(f"{r}@{p.step}" for r, p in kept.items() if p), flush=True)  # fmt: skip
    return trials


def summarize(results: dict[int, list[dict]], direction: str = "minimize") -> list[str]:
    """Per rule: kept no worse than last (test/loss), and the champion's test/loss gap to the best trial's."""
    sign = 1 if direction == "minimize" else -1
    lines = []
    for rule in KEEP_RULES:
        no_worse = total = 0
        gaps, champs, kept_losses = [], [], []
        for trials in results.values():
            for t in trials:
                kept = t["test_loss"][str(t["kept"][rule]["step"])]
                total += 1
                no_worse += kept <= t["test_loss"][str(t["last_step"])] + 1e-9
                kept_losses.append(kept)
            complete = [t for t in trials if t["state"] == "COMPLETE"]
            if complete:
                champ = min(complete, key=lambda t: (sign * t["kept"][rule]["value"], t["number"]))
                champ_loss = champ["test_loss"][str(champ["kept"][rule]["step"])]
                best_loss = min(t["test_loss"][str(t["kept"][rule]["step"])] for t in complete)
                gaps.append(champ_loss - best_loss)
                champs.append(champ_loss)
        lines.append(f"{rule:>20}: kept no worse than last on test/loss in {no_worse}/{total} trials (mean kept "
                     f"test/loss {sum(kept_losses) / len(kept_losses):.4f}); champion's "
                     f"test/loss {' '.join(f'{c:.4f}' for c in champs)} (mean {sum(champs) / len(champs):.4f}), "
                     f"above the best trial's by {' '.join(f'{g:.4f}' for g in gaps)} "
                     f"(mean {sum(gaps) / len(gaps):.4f})")  # fmt: skip
    return lines


def main() -> None:
    seeds = [int(a) for a in sys.argv[1:]] or [0, 1, 2]
    results = {}
    for seed in seeds:
        folder = OUT / f"seed_{seed}"
        done = folder / "results.json"
        if not done.exists():  # resumable: a finished seed is read back
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            trials = run_seed(seed, folder)
            done.write_text(json.dumps(trials, indent=1))
            print(f"seed {seed}: {len(trials)} trials in {time.monotonic() - t0:.0f}s", flush=True)
        results[seed] = json.loads(done.read_text())
    print(f"seeds {seeds}, {sum(len(t) for t in results.values())} trials (complete and pruned):")
    print("\n".join(summarize(results)))


if __name__ == "__main__":
    main()
