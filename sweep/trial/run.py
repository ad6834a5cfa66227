"""One trial, as a recipe that reads top to bottom: prepare its files, launch training, watch it, record it.

The training process streams ``protocol`` events; this side reads them while training runs, forwards
metrics to MLflow, reports each validation point to Optuna's pruner and answers with the verdict the
hook waits for. A trial's value is the validation point its keep rule keeps (``objective.keep``,
``objectives.selection``: the hook applies the same rule), and its adapter is the one saved at that point,
whether the trial ran to the end or was pruned. Its fit (``sweep.fit``) is judged from its curves.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from objectives.noise import se_name
from objectives.selection import Point, kept_point
from sweep import data as data_mod
from sweep import fit as fit_mod
from sweep import groups
from sweep.knobs import trial_values
from sweep.progress import SweepProgress
from sweep.registry.tracking import Tracker
from sweep.search import suggest
from sweep.spec import Spec
from sweep.trial import launcher, placement, protocol
from sweep.trial.placement import CONTEXT_MB, FITTED_MARGIN, GpuSlots, MemoryModel
from sweep.trial.pool import WorkerPool
from sweep.trial.protocol import TrialFiles
from sweep.xtuner.render import Device, packs_rows, render
from sweep.xtuner.tokenized import tokenize_once

log = logging.getLogger("sweep")
METRIC_INTERVAL_S = 5.0  # per-iteration metrics go to MLflow in batches at most this often
TRAIN_KEYS = ("train/loss", "train/lr", "perf/tokens_per_sec", "perf/memory_mb", protocol.RESERVED_KEY)


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
    progress: SweepProgress | None = None
    slots: GpuSlots | None = None  # on GPUs: which GPU(s) each trial gets
    memory: MemoryModel | None = None  # and how much of one it is expected to need
    pool: WorkerPool | None = None  # resident training processes (speed.resident_workers)

    def __post_init__(self) -> None:
        if self.progress is None:
            self.progress = SweepProgress(self.spec.n_trials, self.spec.objective.primary, live=False)


def run_trial(trial: optuna.Trial, ctx: StudyContext) -> float | list[float]:
    """The Optuna objective: one trial, with whatever fails it recorded on the trial.

    Optuna keeps a failed trial's exception only in its log, and with ``n_jobs`` > 1 it never raises
    the exceptions of the last trials at all (``optuna.study._optimize`` waits for them without
    ``result()``): without this a trial could end FAIL with nothing to say why, in the study, in
    MLflow or in the sweep's log.
    """
    try:
        return Trial(trial, ctx).run()
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


@dataclass
class Prepared:
    """A trial's inputs on disk: its rows, its rendered config, and the knob values that made them."""

    values: dict[str, Any]
    files: TrialFiles
    config: Path
    rendered: str  # the config's text (mmengine's runner later dumps its own version over config.py)
    batch_size: int
    max_length: int
    checkpointing: bool | None
    fit_at: int | None = None  # the iteration after which its GPU slot is fitted to its measured reserve (None: never)


@dataclass
class Watch:
    """What the trial learned from its training process's events so far."""

    points: list[tuple[int, float]] = field(default_factory=list)  # (step, primary metric)
    at_step: dict[int, list[float]] = field(default_factory=dict)  # every objective's value, by step
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # every val/ metric, by step
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, train/loss): the fit's other curve
    pruned: bool = False
    end: protocol.End | None = None
    final_step: int | None = None

    def primary_points(self, metric: str) -> list[Point]:
        """The primary metric's points with their standard errors, as the keep rule and the fit read them."""
        return [Point(s, v, self.metrics.get(s, {}).get(se_name(metric), float("nan"))) for s, v in self.points]


class Trial:
    """One configuration trained and recorded; ``run`` returns its best validation value (or values)."""

    def __init__(self, trial: optuna.Trial, ctx: StudyContext) -> None:
        self.trial, self.ctx, self.spec = trial, ctx, ctx.spec
        self.objective = ctx.spec.objective
        self.work = ctx.root / f"trial_{trial.number:04d}"
        self.train_log = self.work / "train.log"
        self.pending: list[tuple[str, float, int]] = []  # training metrics not yet sent to MLflow
        # the GPUs training runs on, the MB reserved there, and whether it must run alone (an out-of-memory's retry)
        self.slot: tuple[list[int], float, bool] | None = None
        self.sent = time.monotonic()

    def run(self) -> float | list[float]:
        """A multi-objective trial returns every objective's value at the primary metric's best point, the
        point its adapter was saved at, so that each Pareto trial's adapter is what its values say."""
        values = trial_values(
            self.spec, suggest(self.trial, self.spec), self.ctx.base_knobs
        )  # first: a resumable trial
        if launcher.STOP.is_set():
            raise launcher.Interrupted("the sweep is stopping; trial not started")
        self.prepared = self.prepare(values)
        self.run_id = self.start_run()
        status = "FAILED"
        try:
            started = time.monotonic()
            rc, gpu_ids = self.train()
            result = self.record(rc, gpu_ids, time.monotonic() - started)
            status = "KILLED" if self.watch.pruned else "FINISHED"
            if self.watch.pruned:
                raise optuna.TrialPruned(f"pruned at step {self.watch.points[-1][0]}")
            return result
        except launcher.Interrupted:
            status = "KILLED"
            self.ctx.tracker.set_tags(self.run_id, {"state": "INTERRUPTED"})
            raise  # run_trial queues the values again
        except _OutOfMemory as oom:
            status = "FAILED"
            return oom.value
        finally:
            self.ctx.progress.trial_ended(self.trial.number)
            self.ctx.tracker.finish(self.run_id, status)

    # -- 1. prepare ------------------------------------------------------------------------------
    def prepare(self, values: dict[str, Any]) -> Prepared:
        """The trial's rows (mixed), its config (rendered), and how to make the rows again (data.json)."""
        ctx, spec, work = self.ctx, self.spec, self.work
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        # rows.jsonl: the rows this trial trains on, readable (with tokenize_once, train.jsonl holds their tokens)
        mix_ratio, mix_seed = float(values["mix_ratio"]), spec.data.seed + self.trial.number
        n_rows = data_mod.mix(ctx.data, mix_ratio, mix_seed, work / "rows.jsonl")
        copies = {"rows.jsonl": ctx.data.folder}  # what each copy of the rows was mixed from (data.json)
        general_val = ctx.data.path("general_val") if ctx.data.counts.get("general_val") else None
        files = TrialFiles(
            work / "rows.jsonl", ctx.data.path("val"), work, n_rows, general_val, data_digest=ctx.data.digest,
            groups=tuple(ctx.data.groups.get("val", ())),
        )  # fmt: skip
        config = work / "config.py"
        batch_size, max_length = int(values["batch_size"]), int(values["max_length"])
        checkpointing = _checkpointing(ctx, batch_size, max_length)
        rendered = render(ctx.base_cfg, spec, values, files, ctx.device, checkpointing)
        config.write_text(rendered, encoding="utf-8")
        # the same tokens, made once per study instead of once per trial (LLaVADataset tokenizes its own rows)
        if spec.speed.tokenize_once and not spec.multimodal:
            tokens = tokenize_once(config, ctx.data)
            train = work / "train.jsonl"
            n_rows = data_mod.mix(ctx.data, mix_ratio, mix_seed, train, tokens)
            copies[train.name] = tokens
            files = dataclasses.replace(files, train=train, n_train_rows=n_rows, tokenized=True)
            rendered = render(ctx.base_cfg, spec, values, files, ctx.device, checkpointing)
            config.write_text(rendered, encoding="utf-8")
        # a trial that is not kept drops its copies; this says how to make them again (keep_adapters)
        data_mod.write_reference(work, ctx.data, mix_ratio, mix_seed, copies)
        # packed rows give every step one shape, so the peak is reached once the optimizer's states exist; rows of
        # their own lengths (or pictures) may peak at any step: their slot keeps its plan
        fit_at = (int(values.get("accumulative_counts") or 1) - 1 + protocol.PEAK_AFTER_ITERS
                  if packs_rows(ctx.base_cfg) and not spec.multimodal else None)  # fmt: skip
        return Prepared(values, files, config, rendered, batch_size, max_length, checkpointing, fit_at)

    def start_run(self) -> str:
        """The trial's MLflow run (nested under the study's) and its Optuna attributes."""
        ctx, trial, p = self.ctx, self.trial, self.prepared
        params = {**p.values, "n_train_rows": p.files.n_train_rows, "data_digest": ctx.data.digest,
                  "trial_number": trial.number}  # fmt: skip
        run_id = ctx.tracker.start_trial(ctx.experiment_id, ctx.parent_run_id, self.spec.study, trial.number, params)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("work_dir", str(self.work))
        trial.set_user_attr("values", dict(p.values))
        ctx.tracker.log_artifact(run_id, p.config, "xtuner")
        log.info("trial %d: started %s", trial.number, _short(p.values))
        ctx.progress.trial_started(trial.number)
        return run_id

    # -- 2. launch, with one retry alone after running out of memory beside other trials -------------------
    def train(self) -> tuple[int, list[int]]:
        p = self.prepared
        for attempt in (1, 2):
            self.watch = Watch()
            self.events = protocol.EventReader(p.files.stream)
            if attempt == 2:  # mmengine's runner dumped the config over config.py, unescaped (render.to_source)
                p.config.write_text(p.rendered, encoding="utf-8")
            try:
                rc, gpu_ids, oom_beside = self._train_on_slot(alone=attempt == 2)
            finally:
                self.flush_metrics()
            if oom_beside:  # our packing guessed wrong, not the trial: run it again, alone
                log.warning("trial %d: out of memory beside other trials on GPU %s; running it again alone",
                            self.trial.number, ",".join(map(str, gpu_ids)))  # fmt: skip
                self.ctx.tracker.set_tags(self.run_id, {"retried_after_oom": "shared GPU"})
                self.train_log.rename(self.work / "train.oom.log")
                p.files.stream.unlink(missing_ok=True)
                p.files.control.unlink(missing_ok=True)
                continue
            return rc, gpu_ids
        raise AssertionError("unreachable")  # pragma: no cover

    def _train_on_slot(self, alone: bool) -> tuple[int, list[int], bool]:
        """One training run on its GPU slot: returns the exit code, the GPUs and whether it ran out of memory beside
        other trials (not ``alone``). What it teaches the memory model (its peak, or that the packing was too tight)
        is taught before its slot frees, so the trials waiting for that slot are placed by it."""
        ctx, trial, p = self.ctx, self.trial, self.prepared
        gpu_ids, need_mb, shared, oom_beside = [], 0.0, False, False
        slots = ctx.slots
        if slots is not None and ctx.memory is not None:
            memory = ctx.memory

            def estimate() -> float:  # asked again while the trial waits: finished trials recalibrate it
                need = memory.estimate(p.batch_size, p.max_length, p.checkpointing is not False)
                return max(need, slots.one_gpu_mb) if alone else need

            gpu_ids, need_mb = _acquire(slots, estimate, self.spec.gpus_per_trial, trial.number)
            self.slot = (gpu_ids, need_mb, alone)
            shared = slots.shared(gpu_ids)
            trial.set_user_attr("gpus", gpu_ids)
            ctx.tracker.set_tags(self.run_id, {"gpus": ",".join(map(str, gpu_ids)),
                                               "memory_estimate_mb": round(need_mb)})  # fmt: skip
        started = time.monotonic()
        trial.set_user_attr("train_started_at", round(time.time(), 3))  # the stream's times are wall-clock too
        try:
            launch = launcher.Launch(p.config, self.work, self.train_log, n_gpus=len(gpu_ids), gpu_ids=gpu_ids,
                                     threads=ctx.threads)  # fmt: skip
            rc = launcher.run(launch, self.poll, start=ctx.pool.start if ctx.pool is not None else launcher.Running)
            # from its slot to its exit: what a trial costs the GPU (waiting for a slot is not in it)
            trial.set_user_attr("train_wall_seconds", round(time.monotonic() - started, 2))
            if rc == 0:
                self._observe_peak(gpu_ids)
            elif ctx.memory is not None:
                ctx.memory.forget(trial.number)  # its early reading is no evidence of a run that failed
                shared = shared or (slots is not None and slots.shared(gpu_ids))
                if not alone and shared and launcher.is_oom(rc, launcher.log_tail(self.train_log)):
                    oom_beside = True
                    ctx.memory.out_of_memory()  # plan every later trial larger
        finally:
            if slots is not None and self.slot is not None:
                slots.release(gpu_ids, self.slot[1])  # what it holds now: fitted while it ran, maybe
            self.slot = None
        return rc, gpu_ids, oom_beside

    def _observe_peak(self, gpu_ids: list[int]) -> None:
        """The finished training run's peak GPU memory, taught to the memory model that plans the next trials."""
        end = self.watch.end
        if end and end.peak_memory_mb and self._own_peak(gpu_ids):
            p = self.prepared
            self.ctx.memory.observe(p.batch_size, p.max_length, p.checkpointing is not False, end.peak_memory_mb,
                                    key=self.trial.number)  # fmt: skip

    def _own_peak(self, gpu_ids: list[int]) -> bool:
        """Whether the peaks this trial reports are its own: not a multi-GPU trial's, and not the joint peak of a
        worker that trains trials at once."""
        ctx = self.ctx
        return ctx.memory is not None and len(gpu_ids) == 1 and (ctx.pool is None or ctx.pool.at_once == 1)

    def _fit_slot(self, reserved_mb: float) -> None:
        """After its first iterations a trial has reached its peak: the memory model learns it then, not at the
        trial's end, and the trial's slot shrinks to it (plus a margin), so that a trial waiting for memory starts
        beside it now. The first guess of a trial's memory is a formula, and on an H100 it planned a batch-4 trial
        at 50.7 GB that used 30 GB (docs/benchmarks.md)."""
        if self.slot is None or self.ctx.slots is None or not self._own_peak(self.slot[0]):
            return
        p, (gpu_ids, need_mb, alone) = self.prepared, self.slot
        self.ctx.memory.observe(p.batch_size, p.max_length, p.checkpointing is not False, reserved_mb,
                                key=self.trial.number)  # fmt: skip
        fitted = CONTEXT_MB + reserved_mb * FITTED_MARGIN
        if fitted < need_mb and not alone:  # a retry after an out-of-memory beside others keeps its GPU to itself
            self.ctx.slots.resize(gpu_ids, need_mb, fitted)
            self.slot = (gpu_ids, fitted, alone)
            log.info(
                "trial %d: measured %.0f MB after %d iterations; its slot on GPU %s shrinks from %.0f to %.0f MB",
                self.trial.number,
                reserved_mb,
                p.fit_at,
                ",".join(map(str, gpu_ids)),
                need_mb,
                fitted,
            )

    # -- 3. watch: called every 0.2 s while training runs --------------------------------------------------
    def poll(self) -> None:
        trial, progress, watch = self.trial, self.ctx.progress, self.watch
        validated = False
        for ev in self.events.read():
            if isinstance(ev, protocol.Train):
                self.pending += [(k, ev.metrics[k], ev.step) for k in TRAIN_KEYS if ev.metrics.get(k) is not None]
                if ev.metrics.get("train/loss") is not None and ev.step is not None:
                    watch.train_loss.append((int(ev.step), float(ev.metrics["train/loss"])))
                if ev.iter == self.prepared.fit_at and ev.metrics.get(protocol.RESERVED_KEY):
                    self._fit_slot(float(ev.metrics[protocol.RESERVED_KEY]))
                progress.trial_step(trial.number, int(ev.step))
            elif isinstance(ev, protocol.Start):
                watch.final_step = ev.final_step
                progress.trial_planned(trial.number, int(ev.final_step))
            elif isinstance(ev, protocol.Val) and ev.step is not None:
                validated = True
                self._validation_point(ev)
            elif isinstance(ev, protocol.AnswerRows) and ev.rows:  # MLflow appends to a table: log only the new rows
                # a LLaVA probe's picture goes into its table; validation rows name theirs (a picture per row is a lot)
                pictures = self.spec.multimodal and ev.table == protocol.Samples.table
                self.ctx.tracker.log_answer_table(self.run_id, ev.rows, ev.table, pictures)
            elif isinstance(ev, protocol.End):
                watch.end = ev
            elif isinstance(ev, protocol.TrainingWarning):
                log.warning("trial %d: %s", trial.number, ev.message)
        # One MLflow call per METRIC_INTERVAL_S at most for the per-iteration curves, at once for a validation
        # point, and whatever is left when training ends (``train`` flushes).
        if validated or time.monotonic() - self.sent >= METRIC_INTERVAL_S:
            self.flush_metrics()

    def _validation_point(self, ev: protocol.Val) -> None:
        """Forward the point, ask the pruner, answer the hook."""
        watch, objective, trial = self.watch, self.objective, self.trial
        step, value = int(ev.step), ev.metrics.get(objective.primary)
        self.pending += [(k, v, step) for k, v in ev.metrics.items()]
        watch.metrics[step] = dict(ev.metrics)
        stop = False
        if value is not None:
            watch.points.append((step, float(value)))
            watch.at_step[step] = [float(ev.metrics.get(n, float("nan"))) for n in objective.names]
            if not objective.multi:  # Optuna prunes single-objective studies only
                trial.report(float(value), step)
                stop = step > 0 and bool(trial.should_prune()) and step < (watch.final_step or step + 1)
            watch.pruned = watch.pruned or stop
            fit = self.fit()
            self.ctx.progress.trial_value(trial.number, step, float(value), watch.final_step, stop,
                                          se=watch.primary_points(objective.primary)[-1].se,
                                          fit=fit.label if fit else "")  # fmt: skip
        protocol.Verdict(step, stop).write(self.prepared.files.control)

    def fit(self) -> fit_mod.Fit | None:
        """The trial's fit from its curves so far (None while too few points)."""
        points = self.watch.primary_points(self.objective.primary)
        return fit_mod.verdict(points, self.watch.train_loss, self.objective.primary_direction)

    def flush_metrics(self) -> None:
        if self.pending:
            self.ctx.tracker.log_metrics(self.run_id, self.pending)
            self.pending = []
        self.sent = time.monotonic()

    # -- 4. record -----------------------------------------------------------------------------------
    def record(self, rc: int, gpu_ids: list[int], seconds: float) -> float | list[float]:
        """The trial's outcome in Optuna and MLflow: its log, its worker, its best point and adapter."""
        ctx, trial, run_id, p, watch = self.ctx, self.trial, self.run_id, self.prepared, self.watch
        metric = self.objective.primary
        ctx.tracker.log_artifact(run_id, self.train_log, "logs")
        self._record_worker()
        if rc != 0:
            tail = launcher.log_tail(self.train_log)
            if launcher.is_oom(rc, tail):
                trial.set_user_attr("error", tail[-2000:])
                raise _OutOfMemory(_out_of_memory(trial, ctx, run_id, watch.points, rc, tail))
            ctx.tracker.set_tags(run_id, {"exit_code": rc})
            raise TrialFailed(f"training exited with code {rc}; the end of {self.train_log}:\n{tail}")
        if not watch.points:
            raise TrialFailed(f"training produced no {metric} value; see {self.train_log}")
        kept = kept_point(watch.primary_points(metric), self.objective.primary_direction, self.objective.keep)
        if kept is None:
            raise TrialFailed(f"every {metric} value was NaN (the training diverged?); see {self.train_log}")
        best_step, best = kept.step, kept.value  # the kept point: "best" by the keep rule
        adapter = p.files.adapter
        if adapter.exists():
            # the rendered text, not mmengine's dump of it that replaced config.py: the dump writes strings as
            # they are, where a placeholder mmengine substitutes on loading could stand (render.to_source)
            (adapter / "xtuner_config.py").write_text(p.rendered, encoding="utf-8")
            ctx.tracker.log_artifact(run_id, adapter, "best_adapter")
            trial.set_user_attr("adapter_path", str(adapter))
        trial.set_user_attr("best_step", best_step)
        trial.set_user_attr("best_value", best)
        trial.set_user_attr("best_value_se", kept.se if kept.se == kept.se else None)
        trial.set_user_attr("keep_rule", self.objective.keep)
        fit = self.fit()
        if fit is not None:
            trial.set_user_attr("fit", fit.to_json())
        trial.set_user_attr("seconds", round(seconds, 1))
        end = watch.end
        trial.set_user_attr("last_step", end.step if end else None)
        peak = end.peak_memory_mb if end else None
        if peak:
            trial.set_user_attr("peak_memory_mb", round(peak))
        if end is not None and end.val_seconds is not None and seconds > 0:
            trial.set_user_attr("val_share", round(end.val_seconds / seconds, 3))
        ctx.tracker.set_tags(
            run_id,
            {
                "state": "PRUNED" if watch.pruned else "COMPLETE",
                "best_step": best_step,
                "last_step": end.step if end else "",
                "seconds": round(seconds, 1),
                "keep_rule": self.objective.keep,
                **({"fit": fit.label} if fit is not None else {}),
            },
        )
        ctx.tracker.log_metrics(run_id, [(f"best/{metric}", best, best_step)])
        self._record_at_best(best_step)
        log.info(
            "trial %d: %s kept %s=%.4f at step %d (of %s, keep %s) in %.0fs; %s",
            trial.number, "pruned," if watch.pruned else "done,", metric, best, best_step,
            end.step if end else "?", self.objective.keep, seconds, fit.label if fit else "too few points for a fit",
        )  # fmt: skip
        trial.set_constraint("oom", 0.0)
        if self.objective.multi:
            values_at_best = watch.at_step[best_step]
            trial.set_user_attr("values_at_best", dict(zip(self.objective.names, values_at_best, strict=True)))
            return values_at_best
        return best

    def _record_at_best(self, best_step: int) -> None:
        """What the kept adapter's point measured (``metrics_at_best``: the report's repetition and no_stop), where
        each group of rows was at its best (``group_best_steps``), and the objective's ``at_most`` constraints."""
        trial, at_best = self.trial, self.watch.metrics.get(best_step, {})
        trial.set_user_attr("metrics_at_best", {k: v for k, v in at_best.items() if k.startswith("val/")})
        names = self.prepared.files.groups
        if names:
            metric = groups.group_metric(self.objective.primary)
            steps = groups.best_steps(self.watch.metrics, metric, names)
            trial.set_user_attr("group_best_steps", {"metric": metric, "steps": steps})
            self.ctx.tracker.set_tags(self.run_id, {f"best_step/{g}": s for g, s in steps.items()})
        over = []
        for name, limit in (self.objective.at_most or {}).items():
            value = at_best.get(name, float("nan"))
            # above 0 is infeasible (Optuna); a metric the point lacks cannot show the trial is within its limit
            trial.set_constraint(name, value - limit if value == value else 1.0)
            if not value <= limit:
                over.append(f"{name}={value:.4g} > {limit:g}")
        if over:
            trial.set_user_attr("infeasible", ", ".join(over))
            self.ctx.tracker.set_tags(self.run_id, {"infeasible": ", ".join(over)})
            log.warning("trial %d: infeasible at its best step %d: %s", trial.number, best_step, ", ".join(over))

    def _record_worker(self) -> None:
        """Which resident worker trained the trial, its how-many-th job, and whether the model was already loaded."""
        done = protocol.Done.read(self.prepared.files.done)
        if done is None:
            return  # a fresh process trained it
        worker = done.worker_info()
        self.trial.set_user_attr("worker", worker)
        self.ctx.tracker.set_tags(self.run_id, {f"worker.{k}": v for k, v in worker.items()})


class _OutOfMemory(Exception):
    """The trial ran out of memory alone: recorded as infeasible, with ``value`` as its result."""

    def __init__(self, value: float | list[float]) -> None:
        super().__init__("out of memory")
        self.value = value


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


def _checkpointing(ctx: StudyContext, batch_size: int, max_length: int) -> bool | None:
    """``placement.checkpointing`` for a trial of this study."""
    return placement.checkpointing(ctx.spec.speed.activation_checkpointing, ctx.memory, ctx.slots, batch_size,
                                   max_length)  # fmt: skip


def _acquire(slots: GpuSlots, estimate: Callable[[], float], n: int, number: int) -> tuple[list[int], float]:
    """Wait for GPU room, but not past a stop request: the GPUs and the MB reserved on them."""
    if slots.too_large(first := estimate()):
        log.warning("trial %d: its memory estimate (%.0f MB) exceeds every GPU; it runs alone and may go OOM",
                    number, first)  # fmt: skip
    waited = False
    try:
        while True:
            try:
                gpus, need_mb = slots.acquire_estimated(estimate, n, timeout=1.0, order=number)
            except TimeoutError:
                if launcher.STOP.is_set():
                    raise launcher.Interrupted("the sweep is stopping; trial not started") from None
                if not waited:
                    log.info("trial %d: waiting for a GPU slot (needs about %.0f MB)", number, estimate())
                    waited = True
                continue
            log.info("trial %d: on GPU %s (estimated %.0f MB)", number, ",".join(map(str, gpus)), need_mb)
            return gpus, need_mb
    except BaseException:
        slots.withdraw(number)  # its place in the queue goes: the trials behind it are not held for it
        raise


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
