"""One trial: sample knob values, mix data, render the config, train, stream metrics, keep the best.

The training process writes a JSON-lines stream (see ``sweep.hooks``); this side reads it while
training runs, forwards metrics to MLflow, reports each validation point to Optuna's pruner and
answers with a verdict the hook waits for. A trial's value is its best validation point, and its
adapter is the one saved at that point, whether the trial ran to the end or was pruned.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from objectives import best_of
from sweep import data as data_mod
from sweep import launcher
from sweep.render import Device, TrialFiles, render
from sweep.space import suggest, trial_values
from sweep.spec import Spec
from sweep.tracking import Tracker

log = logging.getLogger("sweep")
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
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "stop": stop}))
    tmp.replace(path)


def run_trial(trial: optuna.Trial, ctx: StudyContext) -> float:
    """The Optuna objective: train one configuration and return its best validation value."""
    if launcher.STOP.is_set():
        raise launcher.Interrupted("the sweep is stopping; trial not started")
    spec = ctx.spec
    metric = spec.objective.metric
    values = trial_values(spec, suggest(trial, spec), ctx.base_knobs)
    work = ctx.root / f"trial_{trial.number:04d}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    n_rows = data_mod.mix(ctx.data, float(values["mix_ratio"]), spec.data.seed + trial.number, work / "train.jsonl")
    files = TrialFiles(work / "train.jsonl", ctx.data.path("val"), work, n_rows)
    config = work / "config.py"
    config.write_text(render(ctx.base_cfg, spec, values, files, ctx.device), encoding="utf-8")

    params = {**values, "n_train_rows": n_rows, "data_digest": ctx.data.digest, "trial_number": trial.number}
    run_id = ctx.tracker.start_trial(ctx.experiment_id, ctx.parent_run_id, spec.study, trial.number, params)
    trial.set_user_attr("mlflow_run_id", run_id)
    trial.set_user_attr("work_dir", str(work))
    trial.set_user_attr("values", dict(values))
    ctx.tracker.log_artifact(run_id, config, "xtuner")
    log.info("trial %d: started %s", trial.number, _short(values))

    stream = MetricStream(files.stream)
    state: dict[str, Any] = {
        "points": [], "pruned": False, "end": None, "final_step": None,
    }  # fmt: skip
    started = time.monotonic()

    def on_poll() -> None:
        rows: list[tuple[str, float, int]] = []
        for ev in stream.read():
            kind = ev.get("kind")
            if kind == "train":
                rows += [(k, ev[k], ev["step"]) for k in TRAIN_KEYS if ev.get(k) is not None]
            elif kind == "start":
                state["final_step"] = ev["final_step"]
            elif kind == "val":
                step, value = int(ev["step"]), ev.get(metric)
                rows += [(k, v, step) for k, v in ev.items() if "/" in k and isinstance(v, (int, float))]
                stop = False
                if value is not None:
                    state["points"].append((step, float(value)))
                    trial.report(float(value), step)
                    stop = step > 0 and bool(trial.should_prune()) and step < (state["final_step"] or step + 1)
                    state["pruned"] = state["pruned"] or stop
                    log.info(
                        "trial %d: step %d %s=%.4f%s", trial.number, step, metric, value, " -> pruned" if stop else ""
                    )
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
        if rows:
            ctx.tracker.log_metrics(run_id, rows)

    train_log = work / "train.log"
    status = "FAILED"
    try:
        rc = launcher.run(
            launcher.Launch(config, work, train_log, n_gpus=len(ctx.gpu_ids), gpu_ids=ctx.gpu_ids, threads=ctx.threads),
            on_poll,
        )
        seconds = time.monotonic() - started
        ctx.tracker.log_artifact(run_id, train_log, "logs")
        if rc != 0:
            tail = launcher.log_tail(train_log)
            trial.set_user_attr("error", tail[-2000:])
            if launcher.is_oom(rc, tail):
                return _out_of_memory(trial, ctx, run_id, state["points"], rc)
            ctx.tracker.set_tags(run_id, {"state": "FAIL", "error": tail[-4000:], "exit_code": rc})
            log.error("trial %d: training failed (exit code %d):\n%s", trial.number, rc, tail[-1500:])
            raise TrialFailed(f"training exited with code {rc}; see {train_log}")
        if not state["points"]:
            raise TrialFailed(f"training produced no {metric} value; see {train_log}")
        best = best_of([v for _, v in state["points"]], spec.objective.direction)
        best_step = next(s for s, v in state["points"] if v == best)
        adapter = files.adapter
        if adapter.exists():
            shutil.copyfile(config, adapter / "xtuner_config.py")
            ctx.tracker.log_artifact(run_id, adapter, "best_adapter")
            trial.set_user_attr("adapter_path", str(adapter))
        trial.set_user_attr("best_step", best_step)
        trial.set_user_attr("best_value", best)
        trial.set_user_attr("seconds", round(seconds, 1))
        final = state["end"] or {}
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
        return best
    except launcher.Interrupted:
        status = "KILLED"
        ctx.tracker.set_tags(run_id, {"state": "INTERRUPTED"})
        # Queue the same values again, so that the next `sweep run` resumes where this one stopped.
        trial.study.enqueue_trial(trial.params, user_attrs={"resumes_trial": trial.number})
        log.warning("trial %d: interrupted; queued again for the next `sweep run`", trial.number)
        raise
    finally:
        ctx.tracker.finish(run_id, status)


def _out_of_memory(trial: optuna.Trial, ctx: StudyContext, run_id: str, points: list, rc: int) -> float:
    """Record an out-of-memory trial as infeasible: the sampler learns to avoid that region."""
    trial.set_user_attr("reason", "oom")
    trial.set_constraint("oom", 1.0)
    ctx.tracker.set_tags(run_id, {"state": "OOM", "reason": "oom", "exit_code": rc})
    log.error("trial %d: out of memory (exit code %d); marked infeasible", trial.number, rc)
    worst = max if ctx.spec.objective.direction == "minimize" else min
    return (
        worst([v for _, v in points])
        if points
        else (float("inf") if ctx.spec.objective.direction == "minimize" else float("-inf"))
    )


def _short(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
