"""Issue 6's and 13's benchmark: the same 12 LoRA trials, (a) one after another with stock XTuner, (b) with `sweep`.

Run on one GPU machine from the repository root (the wheels of ../shared/gpu/fetch-wheels.sh installed, see
docs/benchmarks.md). Steps, each its own call so that every call stays under the device's 10-minute limit:

    python3 benchmarks/throughput.py prepare            # the Qwen2-1.5B-shaped model and 1,000 synthetic rows
    python3 benchmarks/throughput.py stock 0 6          # trials 0-5 of ORDER with stock `xtuner train`, one after another
    python3 benchmarks/throughput.py stock 6 12         # the rest
    python3 benchmarks/throughput.py sweep              # all 12 with `sweep run` (GPU slots, speed settings)
    python3 benchmarks/throughput.py alone 11 0         # trials 11 and 0 each by itself through `sweep run`
    python3 benchmarks/throughput.py report             # the figures, from the files the steps wrote
    python3 benchmarks/throughput.py merge DIR DIR      # one sweep.json from sweeps of parts of the trials (BENCH_TRIALS)
    python3 benchmarks/throughput.py stepping DIR       # tokens/s by trials stepping at once, from DIR's sweep.json and
                                                        # the trials' metric streams unpacked under DIR (trials.tgz)

Same rows, same order: (b)'s trial number k trains on the study's split (`sweep.data.prepare`: deduplicated,
validation held out) shuffled by `sweep.data.mix` with seed data.seed + k (it shuffles even with no general rows
mixed in), so (a)'s trial of that position trains on that very file (`trial_rows`, made by the sweep's own code)
with the config (seed, sampler, packing, schedule, optimizer, dropout) the sweep renders for it; the report checks
the two rows files' sha256 and prints each trial's losses at steps 1-20 side by side. A trial alone is a one-trial
study whose data.seed is the trial's number in (b), so its trial 0 mixes the same rows in the same order.

Trials: batch size 1-4 x LoRA r 8/16/64, max_length 2048 packed, ITERS iterations each (default 20).
Figures: wall time of (a) and (b) and their ratio, aggregate tokens/s, single-trial MFU (4*N FLOPs per token,
989 TFLOP/s dense bf16 peak of an H100), aggregate MFU of (b) over its wall time, each trial's share of time
outside training steps (a warm trial's, one whose worker reused its loaded model: goal at most 10 %), peak memory.

The realistic variant, 300 iterations a trial: run `sweep` (and `alone`) with BENCH_ITERS=300 into its own $OUT
beside the 20-iteration run's stock.json (copied there, or named by BENCH_STOCK), then `BENCH_ITERS=300 ... report`:
(a) at 300 iterations is then COMPUTED from the 20-iteration run (each trial's start-up, its wall time outside its
steps, plus 300 steady steps) and printed as computed, not measured.

Environment: BENCH_WORK (work folder, default /tmp/bench), OUT (results), BENCH_MODEL, BENCH_ITERS, BENCH_ROWS,
BENCH_TRIALS_PER_WORKER and BENCH_SPEED ((b)'s speed settings: "compile: true" adds to trials_per_worker),
BENCH_STOCK (the stock.json the report reads), BENCH_WARM (1, the default: (b) runs an unmeasured 1-trial, 2-iteration
sweep first, as a user's machine is after their first sweep; 0: a fresh machine's figures); for a CPU dry run BENCH_TRIALS (trial indices in the order run,
e.g. 11,0,7) and BENCH_MAX_LENGTH (packed length: at 2048 the tiny model took about 5 s a step per packed row
on 2 shared CPU cores). On the CPU both sides train in fp32 (OptimWrapper), as `sweep` renders:

    PYTHONPATH=$PWD BENCH_MODEL=$PWD/.cache/tiny-model BENCH_WORK=/tmp/bench-cpu BENCH_ITERS=4 BENCH_ROWS=200 \
      BENCH_TRIALS=11,0,7 BENCH_MAX_LENGTH=256 OUT=/tmp/bench-cpu/out sh -c 'for s in prepare sweep "stock 0 3" \
      "alone 0" report; do python3 benchmarks/throughput.py $s; done'
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import shutil
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
if os.environ.get("BENCH_TRIALS"):  # a shorter list for a CPU dry run, e.g. BENCH_TRIALS=11,0,7
    ORDER = [int(i) for i in os.environ["BENCH_TRIALS"].split(",")]
PARAMS = 1_543_714_304  # the Qwen2-1.5B shape (tied embeddings)
PEAK_FLOPS = 989e12
MAX_LENGTH = int(os.environ.get("BENCH_MAX_LENGTH", "2048"))
TRIALS_PER_WORKER = int(os.environ.get("BENCH_TRIALS_PER_WORKER", "1"))  # (b)'s speed.trials_per_worker
SPEED = os.environ.get("BENCH_SPEED", "")  # more of (b)'s speed settings, as YAML flow pairs: "compile: true"
COMPARED_STEPS = 20  # the report's per-step loss table: steps 1 to 20
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
    """Stock XTuner: `xtuner train` (its tools/train.py main) per trial, one after another, each on the rows file
    the sweep's trial of that position trains on (`trial_rows`)."""
    OUT.mkdir(parents=True, exist_ok=True)
    results = _load(OUT / "stock.json")
    for index in ORDER[start:end]:
        bs, r = TRIALS[index]
        work = WORK / f"stock_{index:02d}"
        env = {**os.environ, **ENV}
        config = WORK / f"stock_{index:02d}.py"
        rows = trial_rows(index)
        config.write_text(stock_config(bs, r, rows))
        t0 = time.monotonic()
        with (work.with_suffix(".log")).open("w") as log:
            rc = subprocess.run(
                [sys.executable, str(ROOT / "benchmarks/stock_train.py"), str(config),
                 "--work-dir", str(work)],
                env=env, stdout=log, stderr=subprocess.STDOUT, check=False,
            ).returncode  # fmt: skip
        wall = time.monotonic() - t0
        it = _stock_iters(work.with_suffix(".log"))
        results[str(index)] = {"bs": bs, "r": r, "rc": rc, "wall": wall, "iters_asked": ITERS,
                               "rows_sha256": _sha256(rows), **it}  # fmt: skip
        if rc != 0 or it["iters"] < ITERS:  # crashed, or trained fewer steps than asked: not comparable
            results[str(index)]["failed"] = True
        print(f"stock trial {index}: bs {bs} r {r} rc {rc} wall {wall:.1f}s steps {it['train_seconds']:.1f}s "
              f"loss {it['last_loss']} peak {it['peak_mb']} MB", flush=True)  # fmt: skip
        (OUT / "stock.json").write_text(json.dumps(results, indent=1))


def spec_text(study: str, n_trials: int, data_seed: int = 0, iters: int = ITERS) -> str:
    """The sweep's spec: (b)'s, and with ``data_seed`` set to a trial's number, a one-trial study whose trial 0 mixes
    its rows with the seed that trial had in (b) (`sweep` mixes trial k's rows with data.seed + k)."""
    return f"""study: {study}
base_config: {ROOT / "benchmarks/bench_base.py"}
model: {{path: {MODEL}, template: qwen_chat}}
data: {{task: {WORK / "train.jsonl"}, val: {WORK / "val.jsonl"}, seed: {data_seed}}}
fixed: {{max_iters: {iters}, max_length: {MAX_LENGTH}, lr: 2.0e-4, lora_alpha: 16, lora_dropout: 0.1}}
search_space:
  batch_size: {{type: categorical, choices: [1, 2, 3, 4]}}
  lora_r: {{type: categorical, choices: [8, 16, 64]}}
sampler: {{type: random, seed: 0}}
pruner: {{type: none}}
n_trials: {n_trials}
eval_every: 1000000
keep_checkpoints: 0
registry: {{name: throughput-adapter}}
speed: {{trials_per_worker: {TRIALS_PER_WORKER}{", " + SPEED if SPEED else ""}}}
"""


def trial_rows(index: int) -> Path:
    """The rows, in their order, that (b)'s trial of ``index`` trains on, made by the sweep's own code: the study's
    split (`sweep.data.prepare`: deduplicated, validation held out) and the trial's mix of it (`sweep.data.mix`
    with seed data.seed + trial number, which shuffles the rows even when no general rows are mixed in). With
    tokenize-once the trial trains on these rows' tokens, mixed with the same seed: the same order."""
    from sweep import data as data_mod
    from sweep.knobs import base_values, trial_values
    from sweep.spec import load_spec
    from sweep.xtuner.config import load_base_config

    folder = WORK / "stock_data"
    folder.mkdir(parents=True, exist_ok=True)
    spec_file = folder / "spec.yaml"
    spec_file.write_text(spec_text("throughput", len(ORDER)))
    spec = load_spec(spec_file)
    shutil.rmtree(folder / "data", ignore_errors=True)  # made again from this run's train.jsonl (prepare refuses
    prepared = data_mod.prepare(spec.data, folder / "data")  # a folder made from other data)
    number = ORDER.index(index)  # (b) enqueues the trials in ORDER: trial number k trains ORDER[k]
    bs, r = TRIALS[index]
    values = trial_values(spec, {"batch_size": bs, "lora_r": r}, base_values(load_base_config(spec.base_config)))
    out = folder / f"rows_{index:02d}.jsonl"
    data_mod.mix(prepared, float(values["mix_ratio"]), spec.data.seed + number, out)
    return out


def stock_config(bs: int, r: int, data_file: Path | None = None, cuda: bool | None = None) -> str:
    """bench_base.py with its knob lines set for one trial: what a user edits by hand today. Without a GPU (a dry
    run) the trial trains in fp32 with mmengine's OptimWrapper, as the config `sweep` renders for the CPU does."""
    text = (ROOT / "benchmarks/bench_base.py").read_text()
    values = {"path": repr(str(MODEL)), "data_file": repr(str(data_file or WORK / "train.jsonl")), "batch_size": bs,
              "iters": ITERS, "lora_r": r, "max_length": MAX_LENGTH}  # fmt: skip
    for name, value in values.items():
        text = re.sub(rf"^{name} = .*$", f"{name} = {value}", text, count=1, flags=re.M)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        text = text.replace("AmpOptimWrapper", "OptimWrapper").replace(
            "torch_dtype=torch.bfloat16", "torch_dtype=torch.float32"
        )
        text = re.sub(r'^    (loss_scale="dynamic"|dtype="bfloat16"),\n', "", text, flags=re.M)
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
        "losses": losses,
        "peak_mb": max(memory) if memory else None,
    }


def sweep() -> None:
    """The same trials through `sweep run`: GPU slots (trials share the GPU by memory), tokenize-once, checkpointing auto.

    First (unless BENCH_WARM=0) a one-trial, 2-iteration sweep of the same model and settings, not measured: the
    machine is then as a user's is after their first sweep (the packages' files in the page cache, Triton's kernel
    cache holding the fused kernels). On a fresh machine both cost a sweep's first trials seconds each (H100 runs in
    docs/benchmarks.md); stock XTuner compiles no kernels."""
    OUT.mkdir(parents=True, exist_ok=True)
    warmed = None
    if os.environ.get("BENCH_WARM", "1") == "1":
        warm = _run_sweep(WORK / "warm", "throughput-warm", ORDER[:1], data_seed=0, iters=2)
        warmed = {"rc": warm["rc"], "wall": round(warm["wall"], 1)}
        print(f"warm-up sweep (1 trial, 2 iterations, not measured): rc {warm['rc']} wall {warm['wall']:.1f}s")
    out = _run_sweep(WORK / "sweep", "throughput", ORDER, data_seed=0) | {"warmed": warmed}
    (OUT / "sweep.json").write_text(json.dumps(out, indent=1))
    print(f"sweep: rc {out['rc']} wall {out['wall']:.1f}s")
    print(out["log_tail"][-1500:])


def alone(indices: list[int]) -> None:
    """Each trial of ``indices`` by itself through `sweep run`: a one-trial study with the trial's params and the
    same data, whose trial 0 mixes its rows with the seed (b)'s trial of that index had (`spec_text`)."""
    OUT.mkdir(parents=True, exist_ok=True)
    results = _load(OUT / "alone.json")
    for index in indices:
        if index not in ORDER:
            raise SystemExit(f"alone {index}: not one of the trials run ({','.join(map(str, ORDER))})")
        number = ORDER.index(index)
        out = _run_sweep(WORK / f"alone_{index:02d}", f"throughput-alone-{index}", [index], data_seed=number)
        results[str(index)] = {"rc": out["rc"], "wall": out["wall"], **out["trials"][str(index)]}
        if out["rc"] != 0:
            results[str(index)]["failed"] = True
            results[str(index)]["log_tail"] = out["log_tail"]
        print(f"alone trial {index}: rc {out['rc']} wall {out['wall']:.1f}s "
              f"losses {results[str(index)].get('losses', [])[:COMPARED_STEPS]}", flush=True)  # fmt: skip
        (OUT / "alone.json").write_text(json.dumps(results, indent=1))


def _run_sweep(folder: Path, study: str, indices: list[int], data_seed: int, iters: int = ITERS) -> dict:
    """`sweep run` of the trials ``indices``, enqueued in that order (trial number k trains ``indices[k]``)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    spec = folder / "spec.yaml"
    spec.write_text(spec_text(study, len(indices), data_seed, iters))
    env = {**os.environ, **ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    enqueue = (
        "import optuna, sys; from sweep.spec import load_spec; from sweep.storage import open_study;"
        f"s = open_study(load_spec('{spec}'), 'sqlite:///{folder / 'sweep.db'}');"
        + "".join(f"s.enqueue_trial({{'batch_size': {TRIALS[i][0]}, 'lora_r': {TRIALS[i][1]}}});" for i in indices)
    )
    subprocess.run([sys.executable, "-c", enqueue], env=env, cwd=folder, check=True)
    t0, launched_at = time.monotonic(), time.time()
    with (folder / "sweep.log").open("w") as log:
        rc = subprocess.run(
            [sys.executable, "-m", "sweep.cli", "run", str(spec), "--storage", f"sqlite:///{folder / 'sweep.db'}",
             "--json", "--heartbeat", "0"],
            env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT, check=False,
        ).returncode  # fmt: skip
    wall = time.monotonic() - t0
    import optuna

    loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{folder / 'sweep.db'}")
    attrs = {t.number: t.user_attrs for t in loaded.trials}
    created = {t.number: t.datetime_start.timestamp() if t.datetime_start else None for t in loaded.trials}
    states = {t.number: t.state.name for t in loaded.trials}
    trials = {}
    for number, index in enumerate(indices):
        trial_dir = folder / f"sweep-runs/{study}/trial_{number:04d}"
        events = _events(trial_dir / "sweep_metrics.jsonl")
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
            "losses": [e["train/loss"] for e in train],
            "rows_sha256": _rows_sha256(trial_dir),
            "peak_mb": end.get("peak_memory_mb"), "allocated_peak_mb": max((e["perf/memory_mb"] for e in train), default=None),
            "val_seconds": end.get("val_seconds"),
            "span": (end.get("time", 0) - start.get("time", 0)) if end and start else None,
            "wall": attrs.get(number, {}).get("train_wall_seconds"), "worker": attrs.get(number, {}).get("worker"),
            "joined": bool(start.get("joined_steps")), "joined_passes": end.get("joined"),
            **timeline(launched_at, created.get(number), attrs.get(number, {})),
            **phases(start, end, sum(times), attrs.get(number, {})),
            "steps_at": step_intervals(events, launched_at),
        }  # fmt: skip
    failed = [i for i, t in trials.items() if t.get("failed")]
    return {"rc": rc, "wall": wall, "iters_asked": iters, "trials": trials, "failed": failed, "launched_at": launched_at,
            "trials_per_worker": TRIALS_PER_WORKER, "speed": SPEED, "mps": _mps_line(folder / "sweep.log"),
            "workers_ready": workers_ready(folder / f"sweep-runs/{study}/workers", launched_at),
            "fork_server": fork_server(folder / f"sweep-runs/{study}/workers", launched_at),
            "last_output": round((folder / "sweep.log").stat().st_mtime - launched_at, 1),
            "log_tail": (folder / "sweep.log").read_text()[-3000:]}  # fmt: skip


def workers_ready(folder: Path, launched_at: float) -> list[float]:
    """When each resident worker could first train, in seconds after `sweep run` was launched (its log's "ready at"
    line): how much of the start before the first step the workers' own imports are."""
    ready = []
    for log in sorted(folder.glob("worker-*.log")):
        found = re.search(r": ready at ([0-9.]+)", log.read_text(errors="replace"))
        if found:
            ready.append(round(float(found.group(1)) - launched_at, 1))
    return sorted(ready)


def fork_server(folder: Path, launched_at: float) -> dict | None:
    """The fork server's "ready at" (seconds after the launch) and how many workers were forked from it, of all that
    said "ready"; None where the sweep started none (speed.fork_workers: false, or an older tree)."""
    logs = sorted(folder.glob("forkserver-*.log"))
    found = re.search(r": ready at ([0-9.]+)", logs[0].read_text(errors="replace")) if logs else None
    if not logs:
        return None
    texts = [log.read_text(errors="replace") for log in folder.glob("worker-*.log")]
    return {"ready": round(float(found.group(1)) - launched_at, 1) if found else None,
            "forked": sum("(forked from" in text for text in texts),
            "workers": sum(": ready at" in text for text in texts)}  # fmt: skip


def _forked_text(server: dict | None) -> str:
    if not server:
        return " (each imported on its own)"
    ready = f", it was ready at {server['ready']:.1f}s" if server.get("ready") is not None else ", it never was ready"
    return f" ({server['forked']} of {server['workers']} forked from the fork server{ready})"


def _mps_line(log: Path) -> str | None:
    """What the sweep's log says of its MPS server (speed.mps): used, or not and why; None where it says nothing."""
    try:
        return next((line.split(" ", 1)[1] for line in log.read_text().splitlines() if " MPS: " in f" {line}"), None)
    except OSError:
        return None


def _rows_sha256(trial_dir: Path) -> str | None:
    """The sha256 of the readable rows file the trial was mixed (its data.json, kept when its copies are dropped)."""
    try:
        return json.loads((trial_dir / "data.json").read_text())["copies"]["rows.jsonl"]["sha256"]
    except (OSError, ValueError, KeyError):
        return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def timeline(launched_at: float, created: float | None, attrs: dict) -> dict[str, float]:
    """When, in seconds after `sweep run` was launched, the trial was asked of Optuna (``asked``), got its slot and
    began training (``slot``) and its training ended (``exit``): where a sweep's wall time goes that no trial's own
    phases show (the start before the first slot, trials waiting for a slot, the work after the last exit)."""
    began, wall = attrs.get("train_started_at"), attrs.get("train_wall_seconds")
    out = {"asked": created - launched_at} if created else {}
    if began and wall:
        out |= {"slot": began - launched_at, "exit": began + wall - launched_at}
    return out


def step_intervals(events: list[dict], launched_at: float) -> list[list[float]]:
    """The trial's training steps as [start, end, tokens], in seconds after `sweep run` was launched: back to back
    from each validation point (the train events carry no clock; the loop's other time between steps is left out,
    so a step is placed early by the loop time of the steps before it since the last validation point)."""
    first_val = next((e["time"] for e in events if e["kind"] == "val"), None)
    if first_val is None:
        return []
    out, at = [], first_val - launched_at
    for e in events:
        if e["kind"] == "val":
            at = max(at, e["time"] - launched_at)
        elif e["kind"] == "train":
            seconds = e["perf/iter_seconds"]
            out.append([round(at, 3), round(at + seconds, 3), round(e["perf/tokens_per_sec"] * seconds)])
            at += seconds
    return out


def stepping(trials: list[list[list[float]]]) -> dict[int, tuple[float, float]]:
    """How fast the GPU trained with k trials stepping at once: k -> (seconds with k stepping, tokens trained in
    them), each step's tokens spread evenly over it. k = 0 is time between the first step and the last with none."""
    edges = sorted({x for steps in trials for s, e, _ in steps for x in (s, e)})
    steps = sorted((s, e, tokens / (e - s)) for one in trials for s, e, tokens in one if e > s)
    out: dict[int, tuple[float, float]] = {}
    active: list[tuple[float, float]] = []  # (end, tokens a second) of the steps running now
    i = 0
    for left, right in itertools.pairwise(edges):
        while i < len(steps) and steps[i][0] <= left:
            active.append((steps[i][1], steps[i][2]))
            i += 1
        active = [(e, r) for e, r in active if e > left]
        seconds, tokens = out.get(len(active), (0.0, 0.0))
        out[len(active)] = (seconds + right - left, tokens + sum(r for _, r in active) * (right - left))
    return out


def _first_step_seconds(trial: dict) -> float:
    return trial["steps_at"][0][1] - trial["steps_at"][0][0] if trial.get("steps_at") else float("nan")


def stepping_lines(sweep_r: dict) -> list[str]:
    """What the GPU gave with 1, 2, 3 ... trials stepping at once: whether more trials at once train more tokens."""
    each = [t.get("steps_at") or [] for t in sweep_r.get("trials", {}).values()]
    by_k = stepping(each)
    lines = []
    for k, (seconds, tokens) in sorted(by_k.items()):
        rate = tokens / seconds if seconds else 0.0
        lines.append(f"      {k} stepping: {seconds:6.1f}s" + (f", {rate:,.0f} tokens/s, MFU {rate * 4 * PARAMS / PEAK_FLOPS:.1%}"
                                                             if k else " (between steps: set-up, validation, waiting)"))  # fmt: skip
    if not lines:
        return []
    firsts = [steps[0] for steps in each if steps]
    later = stepping([steps[1:] for steps in each])
    without = ", ".join(f"{k} at once {tokens / seconds:,.0f} tokens/s ({seconds:.0f}s)"
                        for k, (seconds, tokens) in sorted(later.items()) if k and seconds)  # fmt: skip
    return ["    the GPU's tokens/s by trials stepping at once (steps placed back to back after each validation "
            "point):", *lines,
            f"      each trial's first step left out ({len(firsts)} steps, {sum(e - s for s, e, _ in firsts):.1f}s in all; "
            f"with speed.compile the compile is in it): {without}"]  # fmt: skip


def timeline_lines(sweep_r: dict) -> list[str]:
    """The sweep's wall time split by its trials' timeline: the start, the most trials training at once, the end."""
    trials = [t for t in sweep_r.get("trials", {}).values() if "slot" in t]
    if not trials:
        return []
    if sweep_r.get("parts"):  # each part's times count from its own launch: see each part's own report
        return ["    timeline: one per part, in each part's own report"]
    first, last = min(t["slot"] for t in trials), max(t["exit"] for t in trials)
    edges = sorted([(t["slot"], 1) for t in trials] + [(t["exit"], -1) for t in trials])
    running, most, busy, prev = 0, 0, 0.0, first
    for at, step in edges:
        busy += (at - prev) if running else 0.0
        running, prev = running + step, at
        most = max(most, running)
    return [
        f"    timeline: launch to the first trial's slot {first:.1f}s; first slot to the last trial's exit "
        f"{last - first:.1f}s (at least one trial training {busy:.1f}s of it, at most {most} at once); "
        f"after the last exit to the sweep's end {sweep_r['wall'] - last:.1f}s"
        + (f" (its last output at {sweep_r['last_output'] - last:.1f}s of it)" if "last_output" in sweep_r else ""),
        *(
            [
                f"    workers ready at {', '.join(f'{x:.1f}s' for x in sweep_r['workers_ready'])} after the launch"
                + _forked_text(sweep_r.get("fork_server"))
            ]
            if sweep_r.get("workers_ready")
            else []
        ),
        *(
            f"    trial {i}: asked {t.get('asked', float('nan')):.1f}s, slot {t['slot']:.1f}s, exit {t['exit']:.1f}s, "
            f"first step {_first_step_seconds(t):.1f}s"  # with speed.compile: the layers' compile in it
            for i, t in sorted(sweep_r["trials"].items(), key=lambda kv: kv[1].get("slot", 1e9))
            if "slot" in t
        ),
    ]


def phases(start: dict, end: dict, steps: float, attrs: dict) -> dict[str, float]:
    """Where a trial's time outside its steps went, from its stream's start and end events and its trial's attributes:
    ``setup`` (slot to the loop's start: process or job start, config, runner, data, LoRA; split where the start event
    has its marks into ``handover``, ``runner`` and ``before_train``), ``val`` (validation
    points), ``loop_rest`` (the loop's time in neither steps nor validation: hooks, checkpoints, data loading)
    and ``teardown`` (the loop's end to the exit the sweep saw: the last checkpoint, the job's clean-up)."""
    began, wall = attrs.get("train_started_at"), attrs.get("train_wall_seconds")
    if not (start and end and began and wall):
        return {}
    val = end.get("val_seconds") or 0.0
    span = end["time"] - start["time"]
    out = {"setup": start["time"] - began, "val": val, "loop_rest": span - steps - val,
           "teardown": wall - (end["time"] - began)}  # fmt: skip
    if start.get("job_began") and start.get("runner_built"):  # the set-up's split, from the start event's marks
        out |= {"handover": start["job_began"] - began, "runner": start["runner_built"] - start["job_began"],
                "before_train": start["time"] - start["runner_built"]}  # fmt: skip
    return out


def failures(stock_r: dict, sweep_r: dict) -> list[str]:
    """Why no speed-up may be printed: a trial of either side that failed or is missing, one line each."""
    return stock_failures(stock_r) + sweep_failures(sweep_r)


def stock_failures(stock_r: dict) -> list[str]:
    """(a)'s share of ``failures``: without any, (a)'s own figures stand even where (b) did not run."""
    problems = [f"(a) stock trial {i}: exit code {t.get('rc')}, {t.get('iters')} of {t.get('iters_asked', ITERS)} "
                "iterations" for i, t in stock_r.items() if t.get("failed")]  # fmt: skip
    missing = [str(i) for i in ORDER if str(i) not in stock_r]
    if missing:
        problems.append(f"(a) stock: trials {', '.join(missing)} have no result")
    return problems


def sweep_failures(sweep_r: dict) -> list[str]:
    """(b)'s share of ``failures``: without any, (b)'s own figures stand even where (a) did not run."""
    trials = sweep_r.get("trials", {})
    problems = [f"(b) sweep trial {i}: {t.get('state', 'FAIL')}: {(t.get('error') or '').strip()[-300:]}"
                for i, t in trials.items() if t.get("failed")]  # fmt: skip
    missing = [str(i) for i in ORDER if str(i) not in trials]
    if missing:
        problems.append(f"(b) sweep: trials {', '.join(missing)} have no result")
    if sweep_r and sweep_r.get("rc") not in (0, None):
        problems.append(f"(b) sweep: `sweep run` exited with code {sweep_r['rc']}")
    if sweep_r and sweep_r.get("iters_asked", ITERS) != ITERS:
        problems.append(f"(b) sweep: sweep.json holds a {sweep_r['iters_asked']}-iteration run, not {ITERS}")
    if (sweep_r.get("warmed") or {}).get("rc") not in (0, None):
        problems.append(f"(b) sweep: its warm-up sweep exited with code {sweep_r['warmed']['rc']}: the machine may "
                        "not be warm, so (b) is neither a warm nor a cold figure")  # fmt: skip
    return problems


def _rel(x: float | None, y: float | None) -> float | None:
    return abs(x - y) / max(abs(y), 1e-12) if x is not None and y is not None else None


def loss_comparison(stock_r: dict, sweep_r: dict, alone_r: dict) -> float | None:
    """Each trial's losses at steps 1-20, (a) stock, (b) sweep and, where measured, the trial alone through `sweep`,
    side by side, with the largest relative difference to (b) over every step both ran. Returns the largest (a)-(b)
    difference of all trials (None when no trial has both); (a) is compared only when it ran as many iterations as (b)
    (at another length its learning-rate schedule differs)."""
    worst = None
    print(f"Training loss per step, steps 1-{COMPARED_STEPS} (relative difference |x - b| / |b|):")
    for i in map(str, ORDER):
        b = sweep_r.get("trials", {}).get(i, {})
        a = stock_r.get(i, {}) if stock_r.get(i, {}).get("iters_asked", ITERS) == ITERS else {}
        one = alone_r.get(i, {})
        rows = [(name, r.get("losses")) for name, r in (("(a) stock", a), ("(b) sweep", b), ("alone", one))]
        rows = [(name, losses[:COMPARED_STEPS]) for name, losses in rows if losses]
        if not rows:
            continue
        print(f"  trial {i} (bs {TRIALS[int(i)][0]}, r {TRIALS[int(i)][1]})")
        for name, losses in rows:
            print(f"    {name:<10} " + " ".join(f"{x:.4f}" for x in losses))
        for name, r in (("(a) stock", a), ("alone", one)):
            if r.get("losses") and b.get("losses"):
                diffs = [_rel(x, y) for x, y in zip(r["losses"], b["losses"], strict=False)]  # every step both ran
                step = max(range(len(diffs)), key=lambda k: diffs[k])
                same = (
                    "same rows file"
                    if r.get("rows_sha256") and r.get("rows_sha256") == b.get("rows_sha256")
                    else (
                        "rows file NOT the same"
                        if r.get("rows_sha256") and b.get("rows_sha256")
                        else "rows file unchecked"
                    )
                )
                print(f"    {name} vs (b): largest relative difference {diffs[step]:.2e} (step {step + 1}), "
                      f"{len(diffs)} steps compared, {same}")  # fmt: skip
                if name == "(a) stock":
                    worst = max(worst or 0.0, diffs[step])
    return worst


def report() -> int:
    """Print the figures; a run in which any trial failed prints no speed-up or throughput and returns 1.

    When stock.json holds a shorter run than $BENCH_ITERS (the 300-iteration variant beside the 20-iteration run's
    stock figures), (a) at this length is computed from that run, not measured, and printed as such."""
    stock_r = _load(Path(os.environ.get("BENCH_STOCK", OUT / "stock.json")))
    stock_r = {i: t for i, t in stock_r.items() if int(i) in ORDER}  # a run of part of the trials (BENCH_TRIALS)
    sweep_r = _load(OUT / "sweep.json")
    alone_r = _load(OUT / "alone.json")
    problems = failures(stock_r, sweep_r)
    stock_iters = {t.get("iters_asked", t.get("iters")) for t in stock_r.values()}
    computed = bool(stock_r) and stock_iters != {ITERS}
    tokens_per_trial = {i: TRIALS[int(i)][0] * MAX_LENGTH * ITERS for i in stock_r}
    # (a) at ITERS: measured, or computed from the short run as each trial's start-up (its wall time outside its
    # steps) plus ITERS steady steps (the median step from step 4 on: the short run's slower first steps left out)
    a_time = {i: t["wall"] if not computed else (t["wall"] - t["train_seconds"]) + ITERS * (t.get("steady_iter_seconds") or 0)
              for i, t in stock_r.items()}  # fmt: skip
    stock_wall = sum(a_time.values())
    print(
        f"{ITERS} iterations a trial, max_length {MAX_LENGTH}, trials {','.join(map(str, ORDER))}"
        + (f"; (a) COMPUTED from its {'/'.join(map(str, sorted(stock_iters)))}-iteration run" if computed else "")
    )
    print(f"{'trial':>5} {'bs':>2} {'r':>3} | {'stock wall':>10} {'outside steps':>13} {'iter s':>7} {'loss':>8} {'peak MB':>8}"
          f" | {'sweep steps':>11} {'iter s':>7} {'loss':>8} {'peak MB':>8}")  # fmt: skip
    for i in map(str, ORDER):
        a, b = stock_r.get(i, {}), sweep_r.get("trials", {}).get(i, {})
        outside = 1 - a["train_seconds"] / a["wall"] if a and a.get("wall") else float("nan")
        print(f"{i:>5} {TRIALS[int(i)][0]:>2} {TRIALS[int(i)][1]:>3} | {a.get('wall', 0):>9.1f}s {outside:>12.0%} "
              f"{a.get('steady_iter_seconds') or 0:>7.3f} {a.get('last_loss') or 0:>8.4f} {a.get('peak_mb') or 0:>8}"
              f" | {b.get('train_seconds', 0):>10.1f}s {b.get('steady_iter_seconds') or 0:>7.3f} "
              f"{b.get('last_loss') or 0:>8.4f} {round(b.get('peak_mb') or 0):>8}")  # fmt: skip
    worst = loss_comparison(stock_r, sweep_r, alone_r)
    if worst is not None:
        print(f"largest relative loss difference (a)-(b), all trials, all steps: {worst:.2e}")
    # one side alone (a call with STEPS=sweep or STEPS=stock): its own figures stand when all its trials finished;
    # no speed-up
    sweep_only = bool(sweep_r) and not stock_r and not sweep_failures(sweep_r)
    stock_only = bool(stock_r) and not sweep_r and not stock_failures(stock_r)
    if problems and not (sweep_only or stock_only):
        print("NO SPEED-UP OR THROUGHPUT: trials failed or are missing, so the two sides did not do the same work:")
        print("\n".join(f"    {p}" for p in problems))
        return 1
    if sweep_only:
        print("(a) stock has no results here (not run in this call): (b)'s own figures only, no speed-up")
    if stock_only:
        print("(b) sweep has no results here (not run in this call): (a)'s own figures only, no speed-up")
    total = sum(tokens_per_trial.values())
    if stock_r and computed:
        print(f"(a) stock, one after another, COMPUTED from the {'/'.join(map(str, sorted(stock_iters)))}-iteration "
              f"run (not measured): each trial's start-up plus {ITERS} steady steps: {len(stock_r)} trials, "
              f"{stock_wall:.0f}s, {total / stock_wall:,.0f} tokens/s")  # fmt: skip
    elif stock_r:
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
                print(f"    trial {i} (bs {TRIALS[int(i)][0]}, r {TRIALS[int(i)][1]}) steady: {tps:,.0f} tokens/s, "
                      f"MFU {tps * 4 * PARAMS / PEAK_FLOPS:.1%}, outside steps {1 - t['train_seconds'] / t['wall']:.0%}")  # fmt: skip
        if alone:
            print(f"    best single-trial MFU: {max(alone) * 4 * PARAMS / PEAK_FLOPS:.1%}")
    if sweep_r:
        tokens = sum(t.get("tokens", 0) for t in sweep_r["trials"].values())
        rate = tokens / sweep_r["wall"]
        if sweep_r.get("parts"):
            print(f"(b) ran as {len(sweep_r['parts'])} sweeps one after another (`merge`), walls "
                  f"{' + '.join(f'{w:.0f}s' for w in sweep_r['parts'])}")  # fmt: skip
        print(f"(b) sweep: {len(sweep_r['trials'])} trials, wall {sweep_r['wall']:.0f}s, {rate:,.0f} tokens/s, "
              f"aggregate MFU over the sweep's wall time {rate * 4 * PARAMS / PEAK_FLOPS:.1%} "
              f"(4 x {PARAMS:,} FLOPs a token, {PEAK_FLOPS / 1e12:.0f} TFLOP/s peak)")  # fmt: skip
        joined = sum(bool(t.get("joined")) for t in sweep_r["trials"].values())
        print(f"    speed: {sweep_r.get('speed') or 'defaults'}; "
              f"speed.trials_per_worker {sweep_r.get('trials_per_worker', 1)}: {joined} of "
              f"{len(sweep_r['trials'])} trials stepped joined with others over one shared base model")  # fmt: skip
        print(f"    {sweep_r.get('mps') or 'MPS: the sweep log says nothing of it (no GPU shared, or mps: off)'}")
        warmed = sweep_r.get("warmed")
        print("    machine: " + (f"warmed first by a 1-trial, 2-iteration sweep (rc {warmed['rc']}, {warmed['wall']}s, not "
                                 "measured): page cache and Triton's kernel cache as after a user's first sweep"
                                 if warmed else "not warmed first (BENCH_WARM=0, or a sweep.json older than the option)"))  # fmt: skip
        warm = []
        for i in map(str, ORDER):
            t = sweep_r["trials"].get(i)
            if t and t.get("wall"):
                worker = t.get("worker") or {}
                share = 1 - t["train_seconds"] / t["wall"]
                if worker.get("model_reused"):
                    warm.append((share, i))
                print(f"    trial {i} (bs {t['bs']}, r {t['r']}): {t['wall']:.1f}s from slot to exit, "
                      f"{t['train_seconds']:.1f}s of steps, outside steps {share:.0%}, "
                      f"worker job {worker.get('job', '-')}, model reused {worker.get('model_reused', '-')}, "
                      f"peak {round(t.get('peak_mb') or 0)} MB")  # fmt: skip
                if t.get("joined_passes"):
                    p = t["joined_passes"]
                    print(f"      joined: {p['passes']} passes, {p['trials_per_pass']} trials and {p['rows_per_pass']} "
                          f"rows a pass, a pass {p['pass_s']:.3f}s until it returned, waited {p['wait_s']:.3f}s a step "
                          f"for its pass to begin (the other trials' rows, earlier passes of the step)")  # fmt: skip
                if "setup" in t:
                    print(f"      outside steps: setup {t['setup']:.1f}s, validation {t['val']:.1f}s, "
                          f"rest of the loop {t['loop_rest']:.1f}s, teardown {t['teardown']:.1f}s")  # fmt: skip
                if "runner" in t:
                    print(f"      setup: to the worker {t['handover']:.1f}s, runner (config, model, LoRA, data loaders, "
                          f"optimizer) {t['runner']:.1f}s, weights, resume and hooks' before_train "
                          f"{t['before_train']:.1f}s")  # fmt: skip
        print("\n".join(timeline_lines(sweep_r) + stepping_lines(sweep_r)))
        if warm:
            print(f"    warm trial time outside its steps (model reused): {', '.join(f'{i} {x:.0%}' for x, i in warm)}; "
                  f"largest {max(warm)[0]:.0%} (goal: at most 10 %)")  # fmt: skip
        else:
            print("    warm trial time outside its steps: no trial reused a loaded model")
        if stock_r:
            how = (
                f"(a) computed from the {'/'.join(map(str, sorted(stock_iters)))}-iteration run"
                if computed
                else "both measured"
            )
            print(f"speed-up (a)/(b): {stock_wall / sweep_r['wall']:.2f}x; aggregate tokens/s (b)/(a): "
                  f"{rate / (total / stock_wall):.2f}x ({how})")  # fmt: skip
    return 0


def merge(folders: list[Path]) -> None:
    """One sweep.json in $OUT from runs of parts of ORDER (BENCH_TRIALS), made one after another: the trials of all,
    the wall time their sum. For the 300-iteration variant, whose 12 trials take more than one device call."""
    parts = [_load(folder / "sweep.json") for folder in folders]
    if not all(parts):
        raise SystemExit(
            f"merge: no sweep.json in {', '.join(str(f) for f, r in zip(folders, parts, strict=True) if not r)}"
        )
    for key in ("iters_asked", "speed", "trials_per_worker"):
        if len({json.dumps(p.get(key)) for p in parts}) > 1:
            raise SystemExit(f"merge: the runs differ in {key} ({', '.join(str(p.get(key)) for p in parts)})")
    seen = [i for p in parts for i in p["trials"]]
    if len(seen) != len(set(seen)):
        raise SystemExit(f"merge: trials {sorted({i for i in seen if seen.count(i) > 1})} are in more than one run")
    trials, offset = {}, 0.0
    for part in parts:  # one after another: each part's step times count on from the walls before it
        for i, t in part["trials"].items():
            trials[i] = {**t, "steps_at": [[s + offset, e + offset, n] for s, e, n in t.get("steps_at") or []]}
        offset += part["wall"]
    merged = {**parts[0], "trials": trials, "wall": offset, "rc": next((p["rc"] for p in parts if p["rc"]), 0),
              "failed": [i for p in parts for i in p["failed"]], "parts": [p["wall"] for p in parts]}  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sweep.json").write_text(json.dumps(merged, indent=1))
    print(f"merged {len(parts)} runs, {len(trials)} trials, wall {merged['wall']:.1f}s "
          f"({' + '.join(f'{w:.1f}' for w in merged['parts'])})")  # fmt: skip


def stepping_of(folder: Path) -> None:
    """`stepping_lines` of a run whose sweep.json has no ``steps_at`` yet: from its sweep.json and its trials'
    metric streams (gpu_throughput.sh's trials.tgz, unpacked anywhere under ``folder``)."""
    launched_at = _load(folder / "sweep.json")["launched_at"]
    streams = sorted(folder.glob("**/trial_*/sweep_metrics.jsonl"))
    if not streams:
        raise SystemExit(f"stepping: no trial_*/sweep_metrics.jsonl under {folder} (unpack trials.tgz there)")
    trials = {str(n): {"steps_at": step_intervals(_events(f), launched_at)} for n, f in enumerate(streams)}
    print("\n".join(stepping_lines({"trials": trials})))


def _events(stream: Path) -> list[dict]:
    """A trial's metric stream (sweep_metrics.jsonl) as dicts; [] where it was never written."""
    return [json.loads(x) for x in stream.read_text().splitlines() if x.strip()] if stream.exists() else []


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["report"]
    steps = {
        "prepare": prepare,
        "stock": lambda: stock(int(rest[0]), int(rest[1])),
        "sweep": sweep,
        "alone": lambda: alone([int(i) for i in rest]),
        "report": report,
        "merge": lambda: merge([Path(f) for f in rest]),
        "stepping": lambda: stepping_of(Path(rest[0])),
    }
    sys.exit(steps[command]() or 0)
