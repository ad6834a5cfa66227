"""The checks of ``benchmarks/gpu_smoke.sh``, run in its work folder (``sweep.db``, ``mlflow.db``, ``sweep-runs/``).

    python3 smoke_check.py trials STUDY       every trial COMPLETE or PRUNED (one at least COMPLETE), with its figures
    python3 smoke_check.py champion STUDY     models:/STUDY@champion loads through mlflow.pyfunc and answers
    python3 smoke_check.py same-math A B      trial 0 of A and of B: the same val/loss at every point (bf16 tolerance)
    python3 smoke_check.py joined STUDY       every trial's steps were joined with another's, in one worker, at once
    python3 smoke_check.py llava-champion STUDY PICTURE   the LLaVA champion answers rows of image + question

Each prints what it saw and exits 1 when its check fails.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

STORAGE = "sqlite:///sweep.db"
TRACKING = "sqlite:///mlflow.db"
BF16_REL = 1e-2  # bf16 keeps 8 significant bits: about 0.4 % per rounding


def _events(trial) -> list[dict]:
    stream = Path(trial.user_attrs.get("work_dir", "/nonexistent")) / "sweep_metrics.jsonl"
    if not stream.exists():
        return []
    return [json.loads(line) for line in stream.read_text().splitlines() if line.strip()]


def _study(name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=STORAGE)


def trials(name: str) -> int:
    study = _study(name)
    expected = int(study.user_attrs["spec"]["n_trials"])
    bad = []
    for t in study.trials:
        events = _events(t)
        start = next((e for e in events if e["kind"] == "start"), {})
        end = next((e for e in events if e["kind"] == "end"), {})
        vals = [e for e in events if e["kind"] == "val"]
        train = [e for e in events if e["kind"] == "train"]
        samples = [e for e in events if e["kind"] == "samples"]
        tps = sorted(e["perf/tokens_per_sec"] for e in train[3:])
        print(
            f"{name} trial {t.number}: {t.state.name} {t.params} | iterations {len(train)}, "
            f"frozen weights in 16 bits {start.get('frozen_weights_16bit')}, validation points {len(vals)} "
            f"(val/loss {vals[0]['val/loss']:.4f} at step 0 -> best {end.get('best_value')} at step "
            f"{end.get('best_step')}; last val/rouge_l {vals[-1].get('val/rouge_l')}, val/repetition "
            f"{vals[-1].get('val/repetition')}, val/no_stop {vals[-1].get('val/no_stop')}), probe answers at "
            f"{len(samples)} points, median tokens/s {tps[len(tps) // 2] if tps else 0:.0f}, "
            f"peak reserved {end.get('peak_memory_mb') or 0:.0f} MB"
            if vals
            else f"{name} trial {t.number}: {t.state.name} {t.params} | no validation point"
        )
        if t.state.name not in ("COMPLETE", "PRUNED"):
            bad.append(t.number)
            print("    error: " + (t.user_attrs.get("error") or "(none recorded)")[-1500:].replace("\n", "\n    "))
        elif not vals or not all(math.isfinite(v["val/loss"]) for v in vals) or len(samples) != len(vals):
            bad.append(t.number)
            print("    validation points missing, not finite, or without probe answers")
        elif not all(0.0 <= v.get(m, -1.0) <= 1.0 for v in vals for m in ("val/repetition", "val/no_stop")):
            bad.append(t.number)
            print("    validation points without val/repetition or val/no_stop")
    complete = sum(t.state.name == "COMPLETE" for t in study.trials)
    if not forked_workers(name, Path(study.user_attrs.get("work_dir", "/nonexistent")) / "workers"):
        bad.append("workers")
    if bad or complete == 0 or len(study.trials) != expected:
        print(f"{name}: FAILED: trials {bad} failed; {complete} complete; {len(study.trials)} of {expected} trials")
        return 1
    print(f"{name}: all {len(study.trials)} trials completed or pruned ({complete} complete)")
    return 0


def forked_workers(name: str, folder: Path) -> bool:
    """Where the sweep started a fork server (speed.fork_workers, the default), every worker that said "ready" was
    forked from it: a server that found CUDA initialized after its imports lets the sweep start its workers on their
    own, which still trains, so only this check shows it."""
    servers = sorted(folder.glob("forkserver-*.log"))
    workers = [log.read_text(errors="replace") for log in sorted(folder.glob("worker-*.log"))]
    ready = [text for text in workers if ": ready at" in text]
    forked = [text for text in ready if "(forked from" in text]
    if not servers:
        print(f"{name}: {len(ready)} workers, no fork server (speed.fork_workers off)")
        return True
    print(f"{name}: {len(forked)} of {len(ready)} workers forked from the fork server")
    if len(forked) == len(ready):
        return True
    print(
        "    the fork server's log ends:\n    " + servers[0].read_text(errors="replace")[-1500:].replace("\n", "\n    ")
    )
    return False


def _load_champion(name: str, tag_prefixes: tuple[str, ...]):
    """The study's champion through mlflow.pyfunc, after printing its version and tags; None when there is none."""
    import mlflow

    client = mlflow.MlflowClient(TRACKING, registry_uri=TRACKING)
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except Exception as err:  # noqa: BLE001 - any failure here is the check failing
        print(f"{name}: FAILED: no champion in the registry ({err})")
        return None
    tags = {k: v for k, v in version.tags.items() if k.startswith(tag_prefixes)}
    print(f"{name}: champion is version {version.version} (trial {version.tags.get('trial')}), {tags}")
    mlflow.set_tracking_uri(TRACKING)
    mlflow.set_registry_uri(TRACKING)  # another study's gate may have set it
    return mlflow.pyfunc.load_model(f"models:/{name}@champion")


def champion(name: str) -> int:
    questions = ["Who are you?", "你是谁？"]
    return _champion_answers(
        name, ("test/", "gate"), questions, questions, lambda m: m.model.get_base_model(), "question"
    )


def llava_champion(name: str, picture: str) -> int:
    """A LLaVA champion: loads through mlflow.pyfunc and answers rows of image + question; its test scores beside
    the untrained model's."""
    questions = ["What colour is the shape?", "图中是什么形状？"]
    rows = [{"image": picture, "question": q} for q in questions]
    return _champion_answers(name, ("test/", "untrained_test/", "gate"), rows, questions, lambda m: m.model.llm, "row")


def _champion_answers(
    name: str, tag_prefixes: tuple[str, ...], inputs: list, questions: list[str], llm, what: str
) -> int:
    """The champion (``_load_champion``) answers each of ``inputs`` (``questions``: what each asks) with a string;
    ``llm`` takes its python model to the LLM whose weights tell where and in what dtype it was loaded."""
    import torch

    model = _load_champion(name, tag_prefixes)
    if model is None:
        return 1
    answers = model.predict(inputs)
    weight = next(llm(model.unwrap_python_model()).parameters())
    print(f"{name}: champion loaded on {weight.device} in {weight.dtype} (cuda available: {torch.cuda.is_available()})")
    for q, a in zip(questions, answers, strict=True):
        print(f"    {q} -> {a!r}")
    if len(answers) != len(inputs) or not all(isinstance(a, str) for a in answers):
        print(f"{name}: FAILED: the champion did not answer every {what}")
        return 1
    return 0


def same_math(a: str, b: str) -> int:
    curves = []
    for name in (a, b):
        trial = next(t for t in _study(name).trials if t.number == 0)
        curves.append({e["step"]: e["val/loss"] for e in _events(trial) if e["kind"] == "val"})
    print(f"val/loss of trial 0, step: {a} | {b}")
    worst = 0.0
    for step in sorted(set(curves[0]) | set(curves[1])):
        x, y = curves[0].get(step), curves[1].get(step)
        rel = abs(x - y) / abs(y) if x is not None and y else math.inf
        worst = max(worst, rel)
        print(f"    {step:>5}: {x} | {y}   relative difference {rel:.2e}")
    if not curves[0] or curves[0].keys() != curves[1].keys() or worst > BF16_REL:
        print(f"FAILED: the curves differ (largest relative difference {worst:.2e}, tolerance {BF16_REL})")
        return 1
    print(f"same val/loss within bf16 tolerance (largest relative difference {worst:.2e})")
    return 0


def joined(name: str) -> int:
    """speed.trials_per_worker: every trial stepped joined with the others, in one worker, while they all trained."""
    study = _study(name)
    runs = [(t, _events(t)) for t in study.trials]
    starts = [next((e for e in events if e["kind"] == "start"), {}) for _, events in runs]
    ends = [next((e for e in events if e["kind"] == "end"), {}) for _, events in runs]
    pids = {(t.user_attrs.get("worker") or {}).get("pid") for t, _ in runs}
    overlap = bool(starts) and all(ends) and max(s.get("time", 0) for s in starts) < min(e["time"] for e in ends)
    print(f"{name}: joined steps {[s.get('joined_steps') for s in starts]}, worker pids {sorted(map(str, pids))}, "
          f"all training at once {overlap}")  # fmt: skip
    for (trial, _), end in zip(runs, ends, strict=True):
        print(f"    trial {trial.number}: joined passes {end.get('joined')}")
    shared = any((end.get("joined") or {}).get("trials_per_pass", 0) > 1 for end in ends)
    if len(runs) < 2 or not all(s.get("joined_steps") for s in starts) or len(pids) != 1 or not overlap or not shared:
        print(f"{name}: FAILED: the trials did not train joined in one worker at once")
        return 1
    return 0


if __name__ == "__main__":
    command, *names = sys.argv[1:]
    checks = {
        "trials": trials,
        "champion": champion,
        "same-math": same_math,
        "llava-champion": llava_champion,
        "joined": joined,
    }
    sys.exit(checks[command](*names))
