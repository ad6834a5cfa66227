"""Issue 6's benchmark: the same 12 LoRA trials, (a) one after another with stock XTuner, (b) with `sweep`.

Run on one GPU machine from the repository root (the wheels of ../shared/gpu/fetch-wheels.sh installed, see
docs/benchmarks.md). Steps, each its own call so that every call stays under the device's 10-minute limit:

    python3 benchmarks/throughput.py prepare            # the Qwen2-1.5B-shaped model and 1,000 synthetic rows
    python3 benchmarks/throughput.py stock 0 6          # trials 0-5 with stock `xtuner train`, one after another
    python3 benchmarks/throughput.py stock 6 12         # trials 6-11
    python3 benchmarks/throughput.py sweep              # all 12 with `sweep run` (GPU slots, speed settings)
    python3 benchmarks/throughput.py report             # the figures, from the files the steps wrote

Trials: batch size 1-4 x LoRA r 8/16/64, max_length 2048 packed, ITERS iterations each (default 20).
Figures: wall time of (a) and (b) and their ratio, aggregate tokens/s, single-trial MFU (4*N FLOPs per token,
989 TFLOP/s dense bf16 peak of an H100), each trial's share of time outside training steps, peak memory.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/bench"))
OUT = Path(os.environ.get("OUT", WORK / "out"))
MODEL = Path(os.environ.get("BENCH_MODEL", "/tmp/big"))
ITERS = int(os.environ.get("BENCH_ITERS", "20"))
ROWS = int(os.environ.get("BENCH_ROWS", "1000"))
TRIALS = [(bs, r) for bs in (1, 2, 3, 4) for r in (8, 16, 64)]
ORDER = [11, 0, 7, 4, 10, 1, 8, 3, 9, 2, 6, 5]  # big and small trials interleaved, same order in (a) and (b)
PARAMS = 1_543_714_304  # the Qwen2-1.5B shape (tied embeddings)
PEAK_FLOPS = 989e12
MAX_LENGTH = 2048
ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # fmt: skip


def prepare() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    if not (MODEL / "config.json").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "data/tiny_model.py"), "--shape", "qwen2-1.5b", str(MODEL)], check=True
        )
    rng = random.Random(0)
    words = [w for line in (ROOT / "data/demo/general.jsonl").read_text().splitlines() for w in line.split()]
    words = [re.sub(r"[^A-Za-z]", "", w) for w in words if re.sub(r"[^A-Za-z]", "", w)]

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    def row() -> str:
        user, answer = sentence(rng.randint(10, 60)), sentence(rng.randint(30, 300))
        return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})

    (WORK / "train.jsonl").write_text("\n".join(row() for _ in range(ROWS)) + "\n")
    (WORK / "val.jsonl").write_text("\n".join(row() for _ in range(16)) + "\n")
    print(f"model {MODEL}; {ROWS} training rows, 16 validation rows in {WORK}")


def stock(start: int, end: int) -> None:
    """Stock XTuner: `xtuner train` (its tools/train.py main) per trial, one after another."""
    OUT.mkdir(parents=True, exist_ok=True)
    results = _load(OUT / "stock.json")
    for index in ORDER[start:end]:
        bs, r = TRIALS[index]
        work = WORK / f"stock_{index:02d}"
        env = {**os.environ, **ENV}
        config = WORK / f"stock_{index:02d}.py"
        config.write_text(stock_config(bs, r))
        t0 = time.monotonic()
        with (work.with_suffix(".log")).open("w") as log:
            rc = subprocess.run(
                [sys.executable, str(ROOT / "benchmarks/stock_train.py"), str(config),
                 "--work-dir", str(work)],
                env=env, stdout=log, stderr=subprocess.STDOUT, check=False,
            ).returncode  # fmt: skip
        wall = time.monotonic() - t0
        it = _stock_iters(work.with_suffix(".log"))
        results[str(index)] = {"bs": bs, "r": r, "rc": rc, "wall": wall, **it}
        if rc != 0 or it["iters"] < ITERS:  # crashed, or trained fewer steps than asked: not comparable
            results[str(index)]["failed"] = True
        print(f"stock trial {index}: bs {bs} r {r} rc {rc} wall {wall:.1f}s steps {it['train_seconds']:.1f}s "
              f"loss {it['last_loss']} peak {it['peak_mb']} MB", flush=True)  # fmt: skip
        (OUT / "stock.json").write_text(json.dumps(results, indent=1))


def stock_config(bs: int, r: int) -> str:
    """bench_base.py with its knob lines set for one trial: what a user edits by hand today."""
    text = (ROOT / "benchmarks/bench_base.py").read_text()
    values = {"path": repr(str(MODEL)), "data_file": repr(str(WORK / "train.jsonl")), "batch_size": bs,
              "iters": ITERS, "lora_r": r}  # fmt: skip
    for name, value in values.items():
        text = re.sub(rf"^{name} = .*$", f"{name} = {value}", text, count=1, flags=re.M)
    return text


def _stock_iters(log: Path) -> dict:
    """Per-iteration time, loss and memory from mmengine's log lines (logger interval 1, window 1)."""
    times, losses, memory = [], [], []
    for line in log.read_text(errors="replace").splitlines():
        if "Iter(train)" not in line:
            continue
        t = re.search(r"\btime: ([0-9.]+)", line)
        loss = re.search(r"\bloss: ([0-9.]+)", line)
        mem = re.search(r"\bmemory: ([0-9]+)", line)
        times += [float(t.group(1))] if t else []
        losses += [float(loss.group(1))] if loss else []
        memory += [int(mem.group(1))] if mem else []
    return {
        "train_seconds": sum(times),
        "iters": len(times),
        "steady_iter_seconds": sorted(times[3:])[len(times[3:]) // 2] if len(times) > 3 else None,
        "last_loss": losses[-1] if losses else None,
        "peak_mb": max(memory) if memory else None,
    }


def sweep() -> None:
    """The same trials through `sweep run`: GPU slots (trials share the GPU by memory), tokenize-once, checkpointing auto."""
    OUT.mkdir(parents=True, exist_ok=True)
    folder = WORK / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "spec.yaml"
    spec.write_text(
        f"""study: throughput
base_config: {ROOT / "benchmarks/bench_base.py"}
model: {{path: {MODEL}, template: qwen_chat}}
data: {{task: {WORK / "train.jsonl"}, val: {WORK / "val.jsonl"}, seed: 0}}
fixed: {{max_iters: {ITERS}, max_length: {MAX_LENGTH}, lr: 2.0e-4, lora_alpha: 16, lora_dropout: 0.1}}
search_space:
  batch_size: {{type: categorical, choices: [1, 2, 3, 4]}}
  lora_r: {{type: categorical, choices: [8, 16, 64]}}
sampler: {{type: random, seed: 0}}
pruner: {{type: none}}
n_trials: {len(TRIALS)}
eval_every: 1000000
keep_checkpoints: 0
registry: {{name: throughput-adapter}}
"""
    )
    env = {**os.environ, **ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    enqueue = (
        "import optuna, sys; from sweep.spec import load_spec; from sweep.storage import open_study;"
        f"s = open_study(load_spec('{spec}'), 'sqlite:///{folder / 'sweep.db'}');"
        + "".join(f"s.enqueue_trial({{'batch_size': {TRIALS[i][0]}, 'lora_r': {TRIALS[i][1]}}});" for i in ORDER)
    )
    subprocess.run([sys.executable, "-c", enqueue], env=env, cwd=folder, check=True)
    t0 = time.monotonic()
    with (folder / "sweep.log").open("w") as log:
        rc = subprocess.run(
            [sys.executable, "-m", "sweep.cli", "run", str(spec), "--storage", f"sqlite:///{folder / 'sweep.db'}",
             "--json", "--heartbeat", "0"],
            env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT, check=False,
        ).returncode  # fmt: skip
    wall = time.monotonic() - t0
    import optuna

    study = optuna.load_study(study_name="throughput", storage=f"sqlite:///{folder / 'sweep.db'}")
    attrs = {t.number: t.user_attrs for t in study.trials}
    states = {t.number: t.state.name for t in study.trials}
    trials = {}
    for number, index in enumerate(ORDER):  # enqueued in ORDER: trial number k trains ORDER[k]
        stream = folder / f"sweep-runs/throughput/trial_{number:04d}/sweep_metrics.jsonl"
        events = [json.loads(x) for x in stream.read_text().splitlines() if x.strip()] if stream.exists() else []
        state = states.get(number, "MISSING")
        if state != "COMPLETE" or not any(e["kind"] == "end" for e in events):  # failed, or never finished
            trials[str(index)] = {"bs": TRIALS[index][0], "r": TRIALS[index][1], "failed": True, "state": state,
                                  "error": attrs.get(number, {}).get("error", "")[-500:]}  # fmt: skip
            continue
        train = [e for e in events if e["kind"] == "train"]
        start = next((e for e in events if e["kind"] == "start"), {})
        end = next((e for e in events if e["kind"] == "end"), {})
        times = [e["perf/iter_seconds"] for e in train]
        tokens = sum(e["perf/tokens_per_sec"] * e["perf/iter_seconds"] for e in train)
        trials[str(index)] = {
            "bs": TRIALS[index][0], "r": TRIALS[index][1], "iters": len(train),
            "train_seconds": sum(times), "tokens": tokens,
            "steady_iter_seconds": sorted(times[3:])[len(times[3:]) // 2] if len(times) > 3 else None,
            "last_loss": train[-1]["train/loss"] if train else None,
            "peak_mb": end.get("peak_memory_mb"), "allocated_peak_mb": max((e["perf/memory_mb"] for e in train), default=None),
            "val_seconds": end.get("val_seconds"),
            "span": (end.get("time", 0) - start.get("time", 0)) if end and start else None,
            "wall": attrs.get(number, {}).get("train_wall_seconds"), "worker": attrs.get(number, {}).get("worker"),
            **phases(start, end, sum(times), attrs.get(number, {})),
        }  # fmt: skip
    failed = [i for i, t in trials.items() if t.get("failed")]
    out = {"rc": rc, "wall": wall, "trials": trials, "failed": failed,
           "log_tail": (folder / "sweep.log").read_text()[-3000:]}  # fmt: skip
    (OUT / "sweep.json").write_text(json.dumps(out, indent=1))
    print(f"sweep: rc {rc} wall {wall:.1f}s")
    print(out["log_tail"][-1500:])


def phases(start: dict, end: dict, steps: float, attrs: dict) -> dict[str, float]:
    """Where a trial's time outside its steps went, from its stream's start and end events and its trial's attributes:
    ``setup`` (slot to the loop's start: process or job start, config, runner, data, LoRA), ``val`` (validation
    points), ``loop_rest`` (the loop's time in neither steps nor validation: hooks, checkpoints, data loading)
    and ``teardown`` (the loop's end to the exit the sweep saw: the last checkpoint, the job's clean-up)."""
    began, wall = attrs.get("train_started_at"), attrs.get("train_wall_seconds")
    if not (start and end and began and wall):
        return {}
    val = end.get("val_seconds") or 0.0
    span = end["time"] - start["time"]
    return {"setup": start["time"] - began, "val": val, "loop_rest": span - steps - val,
            "teardown": wall - (end["time"] - began)}  # fmt: skip


def failures(stock_r: dict, sweep_r: dict) -> list[str]:
    """Why no speed-up may be printed: a trial of either side that failed or is missing, one line each."""
    problems = [f"(a) stock trial {i}: exit code {t.get('rc')}, {t.get('iters')} of {ITERS} iterations"
                for i, t in stock_r.items() if t.get("failed")]  # fmt: skip
    problems += [f"(b) sweep trial {i}: {t.get('state', 'FAIL')}: {(t.get('error') or '').strip()[-300:]}"
                 for i, t in sweep_r.get("trials", {}).items() if t.get("failed")]  # fmt: skip
    for side, results in (("(a) stock", stock_r), ("(b) sweep", sweep_r.get("trials", {}))):
        missing = [str(i) for i in ORDER if str(i) not in results]
        if missing:
            problems.append(f"{side}: trials {', '.join(missing)} have no result")
    if sweep_r and sweep_r.get("rc") not in (0, None):
        problems.append(f"(b) sweep: `sweep run` exited with code {sweep_r['rc']}")
    return problems


def report() -> int:
    """Print the figures; a run in which any trial failed prints no speed-up or throughput and returns 1."""
    stock_r = _load(OUT / "stock.json")
    sweep_r = _load(OUT / "sweep.json")
    problems = failures(stock_r, sweep_r)
    tokens_per_trial = {i: TRIALS[int(i)][0] * MAX_LENGTH * ITERS for i in stock_r}
    stock_wall = sum(t["wall"] for t in stock_r.values())
    print(f"{'trial':>5} {'bs':>2} {'r':>3} | {'stock wall':>10} {'outside steps':>13} {'iter s':>7} {'loss':>8} {'peak MB':>8}"
          f" | {'sweep steps':>11} {'iter s':>7} {'loss':>8} {'peak MB':>8}")  # fmt: skip
    for i in map(str, ORDER):
        a, b = stock_r.get(i, {}), sweep_r.get("trials", {}).get(i, {})
        outside = 1 - a["train_seconds"] / a["wall"] if a and a.get("wall") else float("nan")
        print(f"{i:>5} {TRIALS[int(i)][0]:>2} {TRIALS[int(i)][1]:>3} | {a.get('wall', 0):>9.1f}s {outside:>12.0%} "
              f"{a.get('steady_iter_seconds') or 0:>7.3f} {a.get('last_loss') or 0:>8.4f} {a.get('peak_mb') or 0:>8}"
              f" | {b.get('train_seconds', 0):>10.1f}s {b.get('steady_iter_seconds') or 0:>7.3f} "
              f"{b.get('last_loss') or 0:>8.4f} {round(b.get('peak_mb') or 0):>8}")  # fmt: skip
    if problems:
        print("NO SPEED-UP OR THROUGHPUT: trials failed or are missing, so the two sides did not do the same work:")
        print("\n".join(f"    {p}" for p in problems))
        return 1
    if stock_r:
        total = sum(tokens_per_trial.values())
        print(
            f"(a) stock, one after another: {len(stock_r)} trials, wall {stock_wall:.0f}s, {total / stock_wall:,.0f} tokens/s"
        )
        alone = [
            (tokens_per_trial[i] / ITERS) / t["steady_iter_seconds"]
            for i, t in stock_r.items()
            if t.get("steady_iter_seconds")
        ]
        for i, t in stock_r.items():
            if t.get("steady_iter_seconds"):
                tps = TRIALS[int(i)][0] * MAX_LENGTH / t["steady_iter_seconds"]
                print(f"    trial {i} (bs {TRIALS[int(i)][0]}, r {TRIALS[int(i)][1]}) alone: {tps:,.0f} tokens/s, "
                      f"MFU {tps * 4 * PARAMS / PEAK_FLOPS:.1%}, outside steps {1 - t['train_seconds'] / t['wall']:.0%}")  # fmt: skip
        if alone:
            print(f"    best single-trial MFU: {max(alone) * 4 * PARAMS / PEAK_FLOPS:.1%}")
    if sweep_r:
        tokens = sum(t.get("tokens", 0) for t in sweep_r["trials"].values())
        print(
            f"(b) sweep: {len(sweep_r['trials'])} trials, wall {sweep_r['wall']:.0f}s, {tokens / sweep_r['wall']:,.0f} tokens/s"
        )
        for i in map(str, ORDER):
            t = sweep_r["trials"].get(i)
            if t and t.get("wall"):
                worker = t.get("worker") or {}
                print(f"    trial {i} (bs {t['bs']}, r {t['r']}): {t['wall']:.1f}s from slot to exit, "
                      f"{t['train_seconds']:.1f}s of steps, outside steps {1 - t['train_seconds'] / t['wall']:.0%}, "
                      f"worker job {worker.get('job', '-')}, model reused {worker.get('model_reused', '-')}, "
                      f"peak {round(t.get('peak_mb') or 0)} MB")  # fmt: skip
                if "setup" in t:
                    print(f"      outside steps: setup {t['setup']:.1f}s, validation {t['val']:.1f}s, "
                          f"rest of the loop {t['loop_rest']:.1f}s, teardown {t['teardown']:.1f}s")  # fmt: skip
        if stock_r:
            print(f"speed-up (a)/(b): {stock_wall / sweep_r['wall']:.2f}x")
    return 0


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["report"]
    steps = {"prepare": prepare, "stock": lambda: stock(int(rest[0]), int(rest[1])), "sweep": sweep, "report": report}
    sys.exit(steps[command]() or 0)
