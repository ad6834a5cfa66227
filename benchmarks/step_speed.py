"""One trial's training step: stock XTuner against the sweep's training path, same model, rows and order.

Run on one GPU machine from the repository root, after `python3 benchmarks/throughput.py prepare` (the
Qwen2-1.5B-shaped model and 1,000 synthetic rows); each step is its own call so that each stays under the
device's 10-minute limit:

    python3 benchmarks/step_speed.py stock 1 2 4 8       # stock `xtuner train`, checkpointing on (XTuner's default)
    python3 benchmarks/step_speed.py stock-nockpt 4 8    # stock, activation checkpointing off (the memory bar)
    python3 benchmarks/step_speed.py sweep VARIANT...    # the sweep's path, all variants in ONE process (model
                                                         # loaded once, as a resident worker does)
    python3 benchmarks/step_speed.py report              # the table, from $OUT/step_speed.json

A sweep variant is `BATCH:LEVERS`, levers joined by `+` from: off (no lever), chunked, cce, liger (speed.fused_loss),
compile (speed.compile), fastdrop (speed.compile_dropout: fused), exact (speed.compile_exact_casts),
loader (speed.data_workers: 2; else 0), fusedopt (speed.fused_optimizer), ligerk (speed.fused_kernels: on), lora16
(speed.lora_input_16bit), nodrop (lora_dropout 0 instead of 0.1: the math changes, for
comparing compiled and eager curves without dropout masks), rngrecompute (functorch's `functionalize_rng_ops`:
the compiled backward draws the dropout masks again from their seed instead of keeping them; CUDA only, not a
`speed:` setting: with torch 2.9's inductor and these settings the first step never finished on an H200, see
docs/benchmarks.md), profile (torch.profiler over iterations 6-8 of the run,
printed to the log: kernels by GPU time and how busy the GPU was); for example `4:off 4:cce 8:cce+compile 8:cce+compile#2` (`#N`: the same run again in
this process, to see what a later trial of a resident worker pays for compiling). The sweep's path renders the config as `sweep
run` does (frozen weights in 16 bits, activation checkpointing off, the hook) without tokenize-once, so its rows
and their order are stock's. Figures: steady tokens/s (median iteration 4-20), MFU (4 N FLOPs a token, 989 TFLOP/s),
peak memory (max_memory_allocated), the first 20 training losses, compile seconds (first iteration minus steady).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402

ROOT = throughput.ROOT
WORK = throughput.WORK / "step_speed"
OUT = throughput.OUT
ITERS = int(os.environ.get("STEP_ITERS", "20"))
LENGTH = throughput.MAX_LENGTH
RESULTS = OUT / "step_speed.json"
LEVERS = {
    "chunked",
    "cce",
    "liger",
    "compile",
    "fastdrop",
    "exact",
    "fusedopt",
    "nodrop",
    "profile",
    "loader",
    "rngrecompute",
    "ligerk",
    "lora16",
}


def _save(key: str, result: dict) -> None:
    """Each run's figures land in $OUT at once: a call cut at its time limit keeps what it measured."""
    OUT.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[key] = result
    RESULTS.write_text(json.dumps(results, indent=1))


def _figures(batch: int, times: list[float], losses: list[float], peak_mb: float | None) -> dict:
    steady = statistics.median(times[3:]) if len(times) > 3 else None
    tokens = batch * LENGTH / steady if steady else None
    return {
        "batch": batch,
        "iters": len(times),
        "steady_iter_seconds": steady,
        "tokens_per_sec": tokens,
        "mfu": tokens * 4 * throughput.PARAMS / throughput.PEAK_FLOPS if tokens else None,
        "peak_gb": peak_mb / 1024 if peak_mb else None,
        "losses": losses[:20],
        "compile_seconds": max(0.0, times[0] - steady) if steady and times else None,
        "failed": len(times) < ITERS,
    }


def stock(batches: list[int], checkpointing: bool) -> None:
    """XTuner's own train main on bench_base.py, as its users run it (one process a run)."""
    WORK.mkdir(parents=True, exist_ok=True)
    for batch in batches:
        name = f"stock{'' if checkpointing else '-nockpt'}:{batch}"
        text = throughput.stock_config(batch, 64).replace(f"iters = {throughput.ITERS}", f"iters = {ITERS}")
        text = re.sub(r"^checkpointing = .*$", f"checkpointing = {checkpointing}", text, count=1, flags=re.M)
        config = WORK / f"stock_{batch}_{int(checkpointing)}.py"
        config.write_text(text)
        log = config.with_suffix(".log")
        started = time.monotonic()
        with log.open("w") as f:
            rc = subprocess.run([sys.executable, str(ROOT / "benchmarks/stock_train.py"), str(config), "--work-dir",
                                 str(config.with_suffix(""))], env={**os.environ, **throughput.ENV}, stdout=f,
                                stderr=subprocess.STDOUT, check=False).returncode  # fmt: skip
        times, losses, memory = [], [], []
        for line in log.read_text(errors="replace").splitlines():
            if "Iter(train)" in line:
                times += [float(m.group(1)) for m in [re.search(r"\btime: ([0-9.]+)", line)] if m]
                losses += [float(m.group(1)) for m in [re.search(r"\bloss: ([0-9.]+)", line)] if m]
                memory += [int(m.group(1)) for m in [re.search(r"\bmemory: ([0-9]+)", line)] if m]
        result = {**_figures(batch, times, losses, max(memory) if memory else None), "rc": rc,
                  "wall": round(time.monotonic() - started, 1)}  # fmt: skip
        result["failed"] = result["failed"] or rc != 0
        if result["failed"]:
            result["log_tail"] = log.read_text(errors="replace")[-3000:]
        _save(name, result)
        print(name, json.dumps({k: v for k, v in result.items() if k not in ("losses", "log_tail")}), flush=True)


def _sweep_config(batch: int, levers: set[str], work: Path) -> Path:
    """The config `sweep run` would train for this trial (no tokenize-once: stock's rows, stock's order)."""
    from sweep.knobs import base_values, trial_values
    from sweep.spec import load_spec
    from sweep.trial.protocol import TrialFiles
    from sweep.xtuner.config import load_base_config
    from sweep.xtuner.render import Device, render

    fused = next((lever for lever in levers if lever in ("chunked", "cce", "liger")), "off")
    work.mkdir(parents=True, exist_ok=True)
    spec_file = work / "spec.yaml"
    spec_file.write_text(
        f"""study: step-speed
base_config: {ROOT / "benchmarks/bench_base.py"}
model: {{path: {throughput.MODEL}, template: qwen_chat}}
data: {{task: {throughput.WORK / "train.jsonl"}, val: {throughput.WORK / "val.jsonl"}, seed: 0}}
fixed: {{max_iters: {ITERS}, max_length: {LENGTH}, lr: 2.0e-4, lora_alpha: 16, lora_r: 64, batch_size: {batch},
        lora_dropout: {0.0 if "nodrop" in levers else 0.1}}}
search_space: {{}}
eval_every: 100000000
speed: {{fused_loss: {fused}, compile: {str("compile" in levers).lower()}, activation_checkpointing: "off",
        fused_optimizer: {str("fusedopt" in levers).lower()}, compile_dropout: {"fused" if "fastdrop" in levers else "eager"},
        compile_exact_casts: {str("exact" in levers).lower()}, data_workers: {2 if "loader" in levers else 0},
        fused_kernels: {"on" if "ligerk" in levers else "off"}, lora_input_16bit: {"on" if "lora16" in levers else "off"}}}
"""
    )
    spec = load_spec(spec_file)
    base = load_base_config(spec.base_config)
    values = trial_values(spec, {}, base_values(base))
    files = TrialFiles(throughput.WORK / "train.jsonl", throughput.WORK / "val.jsonl", work, throughput.ROWS)
    config = work / "config.py"
    import torch  # a CPU dry run of this script renders the CPU's fp32 config

    device = Device(cuda=torch.cuda.is_available())
    config.write_text(render(base, spec, values, files, device, activation_checkpointing=False))
    return config


@contextlib.contextmanager
def _profiled(on: bool):
    """profile_step's hook in this run's runner (a hook object in the config would break mmengine's dump)."""
    if not on:
        yield
        return
    import profile_step
    from mmengine.runner import Runner

    original = Runner.train

    def train_with_profile(self):
        self.register_hook(profile_step.ProfileHook())
        return original(self)

    Runner.train = train_with_profile
    try:
        yield
    finally:
        Runner.train = original


@contextlib.contextmanager
def _rng_recomputed(on: bool):
    """functionalize_rng_ops for this run only; dynamo does not guard on functorch's config, so the graphs
    compiled before and after are dropped."""
    if not on:
        yield
        return
    import torch
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    functorch_config.functionalize_rng_ops = True
    try:
        yield
    finally:
        functorch_config.functionalize_rng_ops = False
        torch._dynamo.reset()


def sweep(variants: list[str]) -> None:
    """Every variant in this one process, through the resident worker's job function (the model stays loaded)."""
    os.environ.update(throughput.ENV)
    os.environ.pop("XTUNER_SWEEP_CONTROL", None)  # no sweep process answers verdicts here
    from sweep.training import job

    for variant in variants:
        variant, _, again = variant.partition("#")  # "8:cce+compile#2": the same run again in this process
        batch_text, _, lever_text = variant.partition(":")
        batch, levers = int(batch_text), set((lever_text or "off").split("+")) - {"off"}
        if levers - LEVERS:
            raise SystemExit(f"{variant}: unknown lever(s) {sorted(levers - LEVERS)}; known: {sorted(LEVERS)}")
        label = f"{batch}:{'+'.join(sorted(levers)) or 'off'}" + (f"#{again}" if again else "")
        work = WORK / f"sweep_{label.replace(':', '_').replace('#', '_')}"
        name = f"sweep:{label}"
        started = time.monotonic()
        error = None
        try:
            config = _sweep_config(batch, levers, work)
            with _profiled("profile" in levers), _rng_recomputed("rngrecompute" in levers):
                job.train_in_this_process([str(config), "--work-dir", str(work)])
        except BaseException as err:  # noqa: BLE001 - recorded as a failed run; the next variant still runs
            error = f"{type(err).__name__}: {err}"
        events = []
        stream = work / "sweep_metrics.jsonl"
        if stream.exists():
            events = [json.loads(line) for line in stream.read_text().splitlines() if line.strip()]
        train = [e for e in events if e["kind"] == "train"]
        peak = max((e["perf/memory_mb"] for e in train), default=None)
        result = _figures(batch, [e["perf/iter_seconds"] for e in train], [e["train/loss"] for e in train], peak)
        result.update(levers=sorted(levers), wall=round(time.monotonic() - started, 1), error=error)
        result["failed"] = result["failed"] or error is not None
        _save(name, result)
        print(name, json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)


def report() -> int:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not results:
        print(f"no results in {RESULTS}")
        return 1
    print(f"| run | batch | tokens/s | MFU | peak GB | compile s | iters | ({ITERS} iterations, max_length {LENGTH})")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if r.get("failed"):
            print(f"| {name} | {r['batch']} | FAILED: {(r.get('error') or r.get('log_tail') or '')[-200:]!r} |||||")
            continue
        print(f"| {name} | {r['batch']} | {r['tokens_per_sec']:,.0f} | {100 * r['mfu']:.1f} % | {r['peak_gb']:.1f} | "
              f"{r['compile_seconds']:.1f} | {r['iters']} |")  # fmt: skip
    print("\nfirst training losses, side by side (stock, checkpointing on, is the reference for each batch):")
    for name, r in results.items():
        if r.get("losses"):
            print(f"{name:28s} " + " ".join(f"{x:.4f}" for x in r["losses"]))
    print("\nlargest relative loss difference to the run of the same batch, loss and dropout without other levers:")
    for name, r in results.items():
        if not name.startswith("sweep:") or not r.get("losses"):
            continue
        levers = set(r.get("levers") or ()) & {"chunked", "cce", "liger", "nodrop"}
        ref = results.get(f"sweep:{r['batch']}:{'+'.join(sorted(levers)) or 'off'}")
        if ref is None or ref is r or not ref.get("losses"):
            continue
        diffs = [abs(x - y) / abs(y) for x, y in zip(r["losses"], ref["losses"], strict=False) if y]
        step = max(range(len(diffs)), key=diffs.__getitem__)
        print(f"{name:28s} {diffs[step]:.2e} (step {step + 1})")
    failed = [name for name, r in results.items() if r.get("failed")]
    if failed:
        print(f"\n{len(failed)} run(s) failed ({', '.join(failed)}): no speed-up is claimed")
        return 1
    return 0


def main(argv: list[str]) -> int:
    step, args = argv[0], argv[1:]
    if step == "stock":
        stock([int(a) for a in args], checkpointing=True)
    elif step == "stock-nockpt":
        stock([int(a) for a in args], checkpointing=False)
    elif step == "sweep":
        sweep(args)
    elif step == "report":
        return report()
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
