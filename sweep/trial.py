"""One trial: sample knob values, mix data, render the config, train, stream metrics, keep the best.

The training process writes a JSON-lines stream (see ``sweep.hooks``); this side reads it while
training runs, forwards metrics to MLflow, reports each validation point to Optuna's pruner and
answers with a verdict the hook waits for. A trial's value is its best validation point, and its
adapter is the one saved at that point, whether the trial ran to the end or was pruned.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from objectives import best_of
from sweep import atomic, launcher
from sweep import data as data_mod
from sweep.pool import WorkerPool
from sweep.progress import SweepProgress
from sweep.render import Device, TrialFiles, render
from sweep.slots import HEADROOM, GpuSlots, MemoryModel
from sweep.space import suggest, trial_values
from sweep.spec import Spec
from sweep.tokenized import tokenize_once
from sweep.tracking import Tracker

log = logging.getLogger("sweep")
METRIC_INTERVAL_S = 5.0  # per-iteration metrics go to MLflow in batches at most this often
TRAIN_KEYS = ("train/loss", "train/lr", "perf/tokens_per_sec", "perf/memory_mb")


class TrialFailed(RuntimeError):
    """Training exited non-zero; the message holds the end of its log."""


@dataclass
class StudyContext:
    """What every trial of a study shares; built once by ``sweep.study``."""

    spec: Spec
    base_cfg: dict[str, Any]
    base_knobs: dict[str, Any]
    data: data_mod.PreparedData
    root: Path
    device: Device
    tracker: Tracker
    experiment_id: str
    parent_run_id: str
    threads: int | None = None
    gpu_ids: list[int] = field(default_factory=list)
    progress: SweepProgress | None = None
    slots: GpuSlots | None = None  # on GPUs: which GPU(s) each trial gets
    memory: MemoryModel | None = None  # and how much of one it is expected to need
    pool: WorkerPool | None = None  # resident training processes (speed.resident_workers)

    def __post_init__(self) -> None:
        if self.progress is None:
            self.progress = SweepProgress(self.spec.n_trials, self.spec.objective.primary, live=False)


class MetricStream:
    """Reads the events the training process appends, from where it last stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = ""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("r", encoding="utf-8") as f:
                f.seek(self.offset)
                chunk = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        text = self.partial + chunk
        lines = text.split("\n")
        self.partial = lines.pop()  # an incomplete last line waits for the next read
        return [json.loads(line) for line in lines if line.strip()]


def _write_verdict(path: Path, step: int, stop: bool) -> None:
    """The hook polls this file: it must never read half of it."""
    atomic.write_text(path, json.dumps({"step": step, "stop": stop}))


def run_trial(trial: optuna.Trial, ctx: StudyContext) -> float | list[float]:
    """The Optuna objective: `_run_trial`, with whatever fails it recorded on the trial.

    Optuna keeps a failed trial's exception only in its log, and with ``n_jobs`` > 1 it never raises
    the exceptions of the last trials at all (``optuna.study._optimize`` waits for them without
    ``result()``): without this a trial could end FAIL with nothing to say why, in the study, in
    MLflow or in the sweep's log.
    """
    try:
        return _run_trial(trial, ctx)
    except launcher.Interrupted:
        # Queue the same values again, so that the next `sweep run` resumes where this one stopped: also a
        # trial Optuna had just taken off the queue when the stop came, before it started training.
        trial.study.enqueue_trial(trial.params, user_attrs={"resumes_trial": trial.number})
        log.warning("trial %d: interrupted; its values are queued again for the next `sweep run`", trial.number)
        raise
    except optuna.TrialPruned:
        raise
    except Exception as err:
        _record_failure(trial, ctx, err)
        raise


def _record_failure(trial: optuna.Trial, ctx: StudyContext, err: Exception) -> None:
    """The failure's text as the trial's ``error`` (unless training's log already gave one) and in MLflow."""
    try:
        attrs = trial.user_attrs
        error = attrs.get("error")
        if not error:
            error = str(err) if isinstance(err, TrialFailed) else "".join(traceback.format_exception(err)).strip()
            trial.set_user_attr("error", error[-2000:])
            log.error("trial %d failed: %s", trial.number, error[-1500:])
        run_id = attrs.get("mlflow_run_id")
        if run_id:
            ctx.tracker.set_tags(run_id, {"state": "FAIL", "error": error[-4000:]})
    except Exception:  # noqa: BLE001 - recording must not hide the failure itself
        log.exception("trial %d: could not record its failure (%s)", trial.number, err)


def _run_trial(trial: optuna.Trial, ctx: StudyContext) -> float | list[float]:
    """Train one configuration and return its best validation value.

    A multi-objective trial returns every objective's value at the primary metric's best point,
    the point its adapter was saved at, so that each Pareto trial's adapter is what its values say.
    """
    spec = ctx.spec
    objective = spec.objective
    metric = objective.primary
    values = trial_values(spec, suggest(trial, spec), ctx.base_knobs)  # first: an interrupted trial has its values
    if launcher.STOP.is_set():
        raise launcher.Interrupted("the sweep is stopping; trial not started")
    work = ctx.root / f"trial_{trial.number:04d}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # rows.jsonl: the rows this trial trains on, readable (with tokenize_once, train.jsonl holds their tokens)
    mix_ratio, mix_seed = float(values["mix_ratio"]), spec.data.seed + trial.number
    n_rows = data_mod.mix(ctx.data, mix_ratio, mix_seed, work / "rows.jsonl")
    copies = {"rows.jsonl": ctx.data.folder}  # what each copy of the rows was mixed from (data.json)
    general_val = ctx.data.path("general_val") if ctx.data.counts.get("general_val") else None
    files = TrialFiles(
        work / "rows.jsonl", ctx.data.path("val"), work, n_rows, general_val, data_digest=ctx.data.digest
    )
    config = work / "config.py"
    batch_size, max_length = int(values["batch_size"]), int(values["max_length"])
    checkpointing = _checkpointing(ctx, batch_size, max_length)
    rendered = render(ctx.base_cfg, spec, values, files, ctx.device, checkpointing)
    config.write_text(rendered, encoding="utf-8")
    if spec.speed.tokenize_once:  # the same tokens, made once per study instead of once per trial
        tokens = tokenize_once(config, ctx.data)
        train = work / "train.jsonl"
        n_rows = data_mod.mix(ctx.data, mix_ratio, mix_seed, train, tokens)
        copies[train.name] = tokens
        files = dataclasses.replace(files, train=train, n_train_rows=n_rows, tokenized=True)
        rendered = render(ctx.base_cfg, spec, values, files, ctx.device, checkpointing)
        config.write_text(rendered, encoding="utf-8")
    # a trial that is not kept drops its copies; this says how to make them again (keep_adapters)
    data_mod.write_reference(work, ctx.data, mix_ratio, mix_seed, copies)

    params = {**values, "n_train_rows": n_rows, "data_digest": ctx.data.digest, "trial_number": trial.number}
    run_id = ctx.tracker.start_trial(ctx.experiment_id, ctx.parent_run_id, spec.study, trial.number, params)
    trial.set_user_attr("mlflow_run_id", run_id)
    trial.set_user_attr("work_dir", str(work))
    trial.set_user_attr("values", dict(values))
    ctx.tracker.log_artifact(run_id, config, "xtuner")
    log.info("trial %d: started %s", trial.number, _short(values))
    progress = ctx.progress
    progress.trial_started(trial.number)

    stream = MetricStream(files.stream)
    state: dict[str, Any] = {
        "points": [], "pruned": False, "end": None, "final_step": None, "at_step": {},
    }  # fmt: skip
    started = time.monotonic()
    pending: list[tuple[str, float, int]] = []  # training metrics not yet sent to MLflow
    sent = [time.monotonic()]

    def flush_metrics() -> None:
        if pending:
            ctx.tracker.log_metrics(run_id, pending)
            pending.clear()
        sent[0] = time.monotonic()

    def on_poll() -> None:
        rows = pending
        validated = False
        for ev in stream.read():
            kind = ev.get("kind")
            if kind == "train":
                rows += [(k, ev[k], ev["step"]) for k in TRAIN_KEYS if ev.get(k) is not None]
                progress.trial_step(trial.number, int(ev["step"]))
            elif kind == "start":
                state["final_step"] = ev["final_step"]
                progress.trial_planned(trial.number, int(ev["final_step"]))
            elif kind == "val":
                validated = True
                step, value = int(ev["step"]), ev.get(metric)
                rows += [(k, v, step) for k, v in ev.items() if "/" in k and isinstance(v, (int, float))]
                stop = False
                if value is not None:
                    state["points"].append((step, float(value)))
                    state["at_step"][step] = [float(ev.get(n, float("nan"))) for n in objective.names]
                    if not objective.multi:  # Optuna prunes single-objective studies only
                        trial.report(float(value), step)
                        stop = step > 0 and bool(trial.should_prune()) and step < (state["final_step"] or step + 1)
                    state["pruned"] = state["pruned"] or stop
                    progress.trial_value(trial.number, step, float(value), state["final_step"], stop)
                _write_verdict(files.control, step, stop)
            elif kind == "samples":  # MLflow appends to an existing table: log only the new rows
                rows_new = ev["rows"]
                ctx.tracker.client.log_table(
                    run_id, {k: [r[k] for r in rows_new] for k in ("step", "question", "answer")}, "samples.json"
                )
            elif kind == "end":
                state["end"] = ev
            elif kind == "warning":
                log.warning("trial %d: %s", trial.number, ev.get("message"))
        # One MLflow call per METRIC_INTERVAL_S at most for the per-iteration curves (a poll is every 0.2 s),
        # at once for a validation point, and whatever is left when training ends (flush_metrics below).
        if validated or time.monotonic() - sent[0] >= METRIC_INTERVAL_S:
            flush_metrics()

    train_log = work / "train.log"
    status = "FAILED"
    gpu_ids: list[int] = list(ctx.gpu_ids)
    try:
        for attempt in (1, 2):
            if attempt == 2:  # mmengine's runner dumped the config over config.py, unescaped (render.to_source)
                config.write_text(rendered, encoding="utf-8")
            try:
                rc, gpu_ids, shared = _train(ctx, trial, run_id, config, work, train_log, on_poll,
                                             (batch_size, max_length, checkpointing), alone=attempt == 2)  # fmt: skip
            finally:
                flush_metrics()
            if attempt == 1 and rc != 0 and shared and launcher.is_oom(rc, launcher.log_tail(train_log)):
                # Our packing guessed wrong, not the trial: plan larger from now on and run it again, alone.
                ctx.memory.out_of_memory()
                log.warning("trial %d: out of memory beside other trials on GPU %s; running it again alone",
                            trial.number, ",".join(map(str, gpu_ids)))  # fmt: skip
                ctx.tracker.set_tags(run_id, {"retried_after_oom": "shared GPU"})
                train_log.rename(work / "train.oom.log")
                files.stream.unlink(missing_ok=True)
                files.control.unlink(missing_ok=True)
                stream.offset, stream.partial = 0, ""
                state.update(points=[], pruned=False, end=None, final_step=None, at_step={})
                continue
            break
        seconds = time.monotonic() - started
        ctx.tracker.log_artifact(run_id, train_log, "logs")
        _record_worker(trial, ctx, run_id, work / "worker.json")
        if rc != 0:
            tail = launcher.log_tail(train_log)
            if launcher.is_oom(rc, tail):
                trial.set_user_attr("error", tail[-2000:])
                return _out_of_memory(trial, ctx, run_id, state["points"], rc, tail)
            ctx.tracker.set_tags(run_id, {"exit_code": rc})
            raise TrialFailed(f"training exited with code {rc}; the end of {train_log}:\n{tail}")
        if not state["points"]:
            raise TrialFailed(f"training produced no {metric} value; see {train_log}")
        best = best_of([v for _, v in state["points"]], objective.primary_direction)
        if best != best:
            raise TrialFailed(f"every {metric} value was NaN (the training diverged?); see {train_log}")
        best_step = next(s for s, v in state["points"] if v == best)
        adapter = files.adapter
        if adapter.exists():
            # the rendered text, not mmengine's dump of it that replaced config.py: the dump writes strings as
            # they are, where a placeholder mmengine substitutes on loading could stand (render.to_source)
            (adapter / "xtuner_config.py").write_text(rendered, encoding="utf-8")
            ctx.tracker.log_artifact(run_id, adapter, "best_adapter")
            trial.set_user_attr("adapter_path", str(adapter))
        trial.set_user_attr("best_step", best_step)
        trial.set_user_attr("best_value", best)
        trial.set_user_attr("seconds", round(seconds, 1))
        final = state["end"] or {}
        trial.set_user_attr("last_step", final.get("step"))
        peak = final.get("peak_memory_mb")
        if peak:
            trial.set_user_attr("peak_memory_mb", round(peak))
            if ctx.memory is not None and len(gpu_ids) == 1:
                ctx.memory.observe(batch_size, max_length, checkpointing is not False, peak)
        if final.get("val_seconds") is not None and seconds > 0:
            trial.set_user_attr("val_share", round(final["val_seconds"] / seconds, 3))
        ctx.tracker.set_tags(
            run_id,
            {
                "state": "PRUNED" if state["pruned"] else "COMPLETE",
                "best_step": best_step,
                "last_step": final.get("step", ""),
                "seconds": round(seconds, 1),
            },
        )
        ctx.tracker.log_metrics(run_id, [(f"best/{metric}", best, best_step)])
        status = "FINISHED" if not state["pruned"] else "KILLED"
        log.info(
            "trial %d: %s best %s=%.4f at step %d (of %s) in %.0fs",
            trial.number, "pruned," if state["pruned"] else "done,", metric, best, best_step,
            final.get("step", "?"), seconds,
        )  # fmt: skip
        trial.set_constraint("oom", 0.0)
        if state["pruned"]:
            raise optuna.TrialPruned(f"pruned at step {state['points'][-1][0]}")
        if objective.multi:
            values_at_best = state["at_step"][best_step]
            trial.set_user_attr("values_at_best", dict(zip(objective.names, values_at_best, strict=True)))
            return values_at_best
        return best
    except launcher.Interrupted:
        status = "KILLED"
        ctx.tracker.set_tags(run_id, {"state": "INTERRUPTED"})
        raise  # run_trial queues the values again
    finally:
        progress.trial_ended(trial.number)
        ctx.tracker.finish(run_id, status)


def _train(
    ctx: StudyContext,
    trial,
    run_id: str,
    config: Path,
    work: Path,
    train_log: Path,
    on_poll,
    size: tuple[int, int, bool | None],
    alone: bool,
) -> tuple[int, list[int], bool]:
    """One training run on its GPU slot: returns the exit code, the GPUs and whether it shared them."""
    gpu_ids, need_mb, shared = list(ctx.gpu_ids), 0.0, False
    slots = ctx.slots
    if slots is not None and ctx.memory is not None:
        batch_size, max_length, checkpointing = size
        need_mb = ctx.memory.estimate(batch_size, max_length, checkpointing is not False)
        if alone:
            need_mb = max(need_mb, min(slots.total.values()) * HEADROOM)
        gpu_ids = _acquire(slots, need_mb, ctx.spec.gpus_per_trial, trial.number)
        shared = slots.shared(gpu_ids)
        trial.set_user_attr("gpus", gpu_ids)
        ctx.tracker.set_tags(run_id, {"gpus": ",".join(map(str, gpu_ids)), "memory_estimate_mb": round(need_mb)})
    started = time.monotonic()
    trial.set_user_attr("train_started_at", round(time.time(), 3))  # the stream's times are wall-clock too
    try:
        rc = launcher.run(
            launcher.Launch(config, work, train_log, n_gpus=len(gpu_ids), gpu_ids=gpu_ids, threads=ctx.threads),
            on_poll,
            start=ctx.pool.start if ctx.pool is not None else launcher.Running,
        )
        # from its slot to its exit: what a trial costs the GPU (waiting for a slot is not in it)
        trial.set_user_attr("train_wall_seconds", round(time.monotonic() - started, 2))
    finally:
        if slots is not None and gpu_ids:
            shared = shared or slots.shared(gpu_ids)
            slots.release(gpu_ids, need_mb)
    return rc, gpu_ids, shared


def _record_worker(trial: optuna.Trial, ctx: StudyContext, run_id: str, done: Path) -> None:
    """Which resident worker trained the trial, its how-many-th job, and whether the model was already loaded."""
    try:
        info = json.loads(done.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return  # a fresh process trained it
    worker = {k: v for k, v in info.items() if k not in ("rc", "seconds")}  # pid, job, model_reused, memory held
    trial.set_user_attr("worker", worker)
    ctx.tracker.set_tags(run_id, {f"worker.{k}": v for k, v in worker.items()})


def _checkpointing(ctx: StudyContext, batch_size: int, max_length: int) -> bool | None:
    """Activation checkpointing: what the spec says, or (auto, on GPUs) off when the trial fits without it.

    Off computes the same gradients (XTuner's losses were equal to the fourth decimal, ../shared/gpu)
    about 37 % faster, for about twice the activation memory. None: leave the base config's choice.
    """
    choice = ctx.spec.speed.activation_checkpointing
    if choice != "auto":
        return choice == "on"
    if ctx.slots is None or ctx.memory is None:
        return None
    smallest = min(ctx.slots.total.values())
    return ctx.memory.estimate(batch_size, max_length, checkpointing=False) > smallest * HEADROOM


def _acquire(slots: GpuSlots, need_mb: float, n: int, number: int) -> list[int]:
    """Wait for GPU room, but not past a stop request."""
    waited = False
    while True:
        try:
            gpus = slots.acquire(need_mb, n, timeout=1.0)
        except TimeoutError:
            if launcher.STOP.is_set():
                raise launcher.Interrupted("the sweep is stopping; trial not started") from None
            if not waited:
                log.info("trial %d: waiting for a GPU slot (needs about %.0f MB)", number, need_mb)
                waited = True
            continue
        log.info("trial %d: on GPU %s (estimated %.0f MB)", number, ",".join(map(str, gpus)), need_mb)
        return gpus


def _out_of_memory(
    trial: optuna.Trial, ctx: StudyContext, run_id: str, points: list, rc: int, tail: str
) -> float | list[float]:
    """Record an out-of-memory trial as infeasible: the sampler learns to avoid that region."""
    trial.set_user_attr("reason", "oom")
    trial.set_constraint("oom", 1.0)
    ctx.tracker.set_tags(run_id, {"state": "OOM", "reason": "oom", "exit_code": rc})
    # which memory ran out (GPU, host, or the kernel's OOM killer) is on the error's last line
    said = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "killed, nothing logged")
    log.error("trial %d: out of memory (exit code %d): %s; marked infeasible", trial.number, rc, said[-300:])
    objective = ctx.spec.objective
    if objective.multi:  # infeasible anyway: the values only need to be finite-or-inf numbers
        return [float("inf") if d == "minimize" else float("-inf") for d in objective.directions]
    worst = max if objective.primary_direction == "minimize" else min
    return (
        worst([v for _, v in points])
        if points
        else (float("inf") if objective.primary_direction == "minimize" else float("-inf"))
    )


def _short(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
