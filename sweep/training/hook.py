"""The sweep's mmengine hook inside XTuner's training: when to validate, what to stream, when to stop.

Validation is placed at fixed counts of training rows seen (``eval_every``), so trials with different
batch sizes, epochs and packing report on the same x-axis, which is what Optuna's pruners compare and
what MLflow plots. Each point's exact values, with their standard errors, go to the trial as ``protocol``
events; the adapter is saved whenever ``objective.keep``'s rule keeps the point (``objectives.selection``, the
rule the trial values itself by); after each point the hook waits for the trial's verdict (go on, or stop
because the trial was pruned). The metrics themselves live beside it: ``metrics`` (losses, per group of rows
too), ``answers`` (greedy answers: ROUGE-L, repetition, runaway answers, the answer tables), ``baseline`` (the
shared step-0 point).
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from mmengine.dist import broadcast_object_list, get_world_size, is_main_process
from mmengine.hooks import Hook

from objectives import WEIGHTED, weighted
from objectives.noise import se_name, weighted_se
from objectives.selection import Keeper, Point
from sweep import atomic, groups
from sweep.training import baseline, compiled, cotrain, fused_loss, job, kernels, llava
from sweep.training.amp import keep_frozen_weights_16bit, training_autocast, trains_under_autocast
from sweep.training.memory import PEAK_KEY
from sweep.training.metrics import ValLossMetric, general_loss
from sweep.trial import protocol


def _unwrap(model: Any) -> Any:
    while not hasattr(model, "llm"):
        inner = getattr(model, "module", None) or getattr(model, "model", None)
        if inner is None:
            raise AttributeError(f"no XTuner model with an .llm inside {type(model).__name__}")
        model = inner
    return model


def _base_llm(runner) -> Any:
    llm = _unwrap(runner.model).llm
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


class SweepHook(Hook):
    """Validation schedule by samples seen, metric stream, best adapter, and the prune handshake."""

    priority = "LOW"

    def __init__(self, **settings: Any) -> None:
        self.settings = s = protocol.HookSettings(**settings)
        self.keeper = Keeper("minimize" if s.rule == "less" else "maximize", s.keep)
        self.save_points = os.environ.get(protocol.SAVE_POINTS_ENV) == "1"
        self.stream_path = Path(s.stream)
        self.control_path = Path(s.control)
        self.adapter_dir = Path(s.adapter_dir)
        self.baseline = Path(s.baseline) if s.baseline else None
        self.wait_for_verdict = os.environ.get(protocol.CONTROL_ENV) == "1"
        self.step = 0
        self.stopped = False
        self.val_seconds = 0.0
        self.shares_baseline = False  # decided at step 0: LoRA B all zero, so the model is its base
        self.answers = None
        self._runner_built: float | None = None  # before_run: the runner's model, data loaders and optimizer exist

    # -- the x-axis ---------------------------------------------------------------------------
    def samples_seen(self, iters_done: int) -> int:
        """Training rows seen after ``iters_done`` iterations, counted in rows of the trial's data."""
        return round(iters_done * self.settings.n_train_rows / self.iters_per_epoch)

    def _emit(self, event: protocol.Event) -> None:
        if is_main_process():
            protocol.emit(self.stream_path, event)

    def before_run(self, runner) -> None:
        self._runner_built = time.time()

    def before_train(self, runner) -> None:
        self.iters_per_epoch = len(runner.train_dataloader)
        self.max_iters = runner.max_iters
        self.next_point = self.settings.eval_every
        self.final_step = self.samples_seen(self.max_iters)
        amp = trains_under_autocast(runner.optim_wrapper)
        # ValLoop wraps each step in autocast(enabled=fp16), which with False switches _validate's autocast
        # off; enabled, it keeps the dtype of the autocast it runs inside (training's).
        runner.val_loop.fp16 = amp
        llm = _unwrap(runner.model).llm
        in_16bit = keep_frozen_weights_16bit(llm) if self.settings.frozen_16bit and amp else 0
        if in_16bit and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the fp32 copies just dropped
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # the Transformers model PEFT wraps
        if self.settings.fused_loss != "off":
            fused_loss.install(base, self.settings.fused_loss)
        fused = kernels.use_fused_kernels(base, self.settings.fused_kernels)
        input_16bit = kernels.keep_lora_input_16bit(llm, self.settings.lora_input_16bit)
        compiled.use_compiled_layers(base, self.settings.compile, fused_dropout=self.settings.compile_dropout == "fused",
                                     exact_casts=self.settings.compile_exact_casts)  # fmt: skip
        if self.settings.general_val:
            self.general_loader = runner.build_dataloader(self.settings.general_val)
        if self.settings.groups:
            self._hand_groups_to_metrics(runner)
        if self.settings.generation:
            from sweep.training.answers import Answers

            self.answers = Answers(self.settings.generation)
        joined = self._join_other_trials(runner)  # last: the set-up's draws from the global generators are done
        self._emit(protocol.Start(self.max_iters, self.iters_per_epoch, self.final_step, get_world_size(), in_16bit,
                                  self.settings.fused_loss, self.settings.compile,
                                  fused_kernels=fused if self.settings.fused_kernels and not joined else 0,
                                  lora_input_16bit=input_16bit if self.settings.lora_input_16bit else 0,
                                  job_began=job.began(),
                                  runner_built=self._runner_built, joined_steps=joined))  # fmt: skip

    def _join_other_trials(self, runner) -> bool:
        """In a worker that trains jobs at once, step together with the other trials on this base model (a trial
        that cannot raises, saying why)."""
        try:
            if cotrain.shared_from(_base_llm(runner)) is None:
                return False  # this worker trains one job at a time
            # the joined pass runs its joint model, whose norms and MLPs keep their own code (fused kernels there have
            # not run on a GPU yet)
            cotrain.join(_unwrap(runner.model), runner.optim_wrapper, self.settings.fused_loss)
            return True
        finally:
            job.setup_done()

    def _hand_groups_to_metrics(self, runner) -> None:
        """Each validation row's group, from the validation dataset itself (render keeps its ``group`` column), in
        the order ``ValLossMetric`` gets its results: rows XTuner's pipeline dropped cannot shift them."""
        dataset = runner.val_loop.dataloader.dataset
        dataset = getattr(dataset, "text_data", dataset)  # LLaVADataset keeps its rows' columns there
        if groups.KEY not in getattr(dataset, "column_names", ()):
            raise RuntimeError(f"the validation dataset has no {groups.KEY!r} column; render keeps it for groups")
        column = list(dataset[groups.KEY])
        for metric in runner.val_loop.evaluator.metrics:
            if isinstance(metric, ValLossMetric):
                metric.groups = column

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        if runner.iter == 0:  # after every hook's before_train (CheckpointHook's too)
            self._validate(runner, 0)  # the untrained starting point: a baseline, and "before training" samples
        self._t0 = time.perf_counter()

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        seconds = time.perf_counter() - self._t0
        done = runner.iter + 1
        self.step = self.samples_seen(done)
        data = (data_batch or {}).get("data", {})
        mask = data.get("attention_mask")
        ids = data.get("input_ids")
        tokens = int(mask.sum()) if mask is not None else (ids.numel() if ids is not None else 0)
        tokens *= get_world_size()
        reserved_mb = None
        if torch.cuda.is_available():  # the peak StepMemoryHook read before LoggerHook reset it
            memory_mb = runner.message_hub.get_info(PEAK_KEY, torch.cuda.max_memory_allocated() / 2**20)
            reserved_mb = torch.cuda.max_memory_reserved() / 2**20  # what the sweep plans by (no sync: a counter)
        else:
            memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        loss = (outputs or {}).get("loss")
        metrics = {
            "train/loss": float(loss) if loss is not None else None,
            "train/lr": float(runner.optim_wrapper.get_lr()["lr"][0]),
            "perf/tokens_per_sec": tokens / seconds if seconds > 0 else 0.0,
            "perf/memory_mb": memory_mb,
            protocol.RESERVED_KEY: reserved_mb,
            "perf/iter_seconds": seconds,
        }
        self._emit(protocol.Train(done, self.step, metrics))
        if done >= self.max_iters:
            self._validate(runner, self.final_step)
        elif self.step >= self.next_point:
            every = self.settings.eval_every
            point = self.step - self.step % every
            self.next_point = point + every
            self._validate(runner, point)

    # -- validation and the verdict -----------------------------------------------------------
    def _validate(self, runner, step: int) -> None:
        # trials stepping beside this one go on while it validates and waits for its verdict; none is built meanwhile
        with cotrain.away():
            with cotrain.SETUP:
                self._measure(runner, step)
            stop = [self._await_verdict(step) if is_main_process() and step > 0 else False]
        if get_world_size() > 1:
            broadcast_object_list(stop)
        if stop[0] and runner.iter + 1 < self.max_iters:
            runner.train_loop.stop_training = True
            self.stopped = True

    def _measure(self, runner, step: int) -> None:
        """The validation point at ``step``: measured here, or the study's shared step-0 point."""
        self._pending_step = step
        started = time.perf_counter()
        # Validation draws no random numbers from training's streams (a data loader's iterator takes
        # one): a trial trains the same whether a point was measured, read from the study, or skipped.
        # Every forward pass of validation (loss, general loss, generation, probes) runs under training's
        # autocast: with frozen weights in 16 bits and fp32 activations, a bare forward pass cannot multiply.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), training_autocast(runner.optim_wrapper):
            if step == 0:
                self.shares_baseline = (
                    self.baseline is not None and get_world_size() == 1 and baseline.applies(_unwrap(runner.model).llm)
                )
            cached = baseline.read(self.baseline) if step == 0 and self.shares_baseline else None
            if cached is not None:  # the untrained point, as another trial of this study measured it
                self._record_point(runner, step, cached["metrics"], cached.get("tables") or {}, cached=True)
            else:
                runner.val_loop.run()
        runner.model.train()  # ValLoop leaves the model in eval mode: dropout would stay off until the next epoch
        self.val_seconds += time.perf_counter() - started

    def after_val_epoch(self, runner, metrics: dict[str, float] | None = None) -> None:
        metrics = metrics if metrics is not None else {}
        step = getattr(self, "_pending_step", self.step)
        # Added before CheckpointHook (lower priority) reads the metrics for save_best.
        if self.settings.general_val:
            metrics["val/general_loss"], metrics[se_name("val/general_loss")] = general_loss(
                runner.model, self.general_loader
            )
        tables = self._answer(runner, step, metrics) if self.answers is not None else {}
        if step == 0 and self.shares_baseline and is_main_process():
            baseline.store(self.baseline, metrics, tables)
        self._record_point(runner, step, metrics, tables)

    def _answer(self, runner, step: int, metrics: dict[str, float]) -> dict[str, list[dict]]:
        """Greedy answers on the main process; every rank gets their metrics (CheckpointHook may read any of them)."""
        found: list[dict[str, float] | None] = [None]
        tables: dict[str, list[dict]] = {}
        if is_main_process():
            point = self.answers.at_point(_unwrap(runner.model), step)
            found[0], tables = point.metrics, point.tables
        if get_world_size() > 1:
            broadcast_object_list(found)
        metrics.update({k: float(v) for k, v in (found[0] or {}).items()})
        return tables

    def _record_point(self, runner, step: int, metrics: dict[str, float], tables: dict[str, list[dict]],
                      cached: bool = False) -> None:  # fmt: skip
        """Stream one validation point (and its answer tables); keep its adapter if the keep rule keeps it."""
        for table, rows in tables.items():
            if rows:
                self._emit(protocol.ANSWER_TABLES[table](step, rows))
        if self.settings.weights:
            metrics[WEIGHTED] = weighted(metrics, self.settings.weights)
            metrics[se_name(WEIGHTED)] = weighted_se(metrics, self.settings.weights)
        value = metrics.get(self.settings.metric)
        se = metrics.get(se_name(self.settings.metric))
        point = Point(step, float(value), float(se) if se is not None else float("nan")) if value is not None else None
        if point is not None and self.keeper.offer(point) and is_main_process():
            self._save_adapter(runner, self.adapter_dir)
        if self.save_points and is_main_process():
            self._save_adapter(runner, protocol.point_adapter(self.adapter_dir.parent, step))
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._emit(protocol.Val(step, runner.iter + 1, values, self.best_step, cached))

    @property
    def best_step(self) -> int | None:
        """The step of the kept point (whose adapter is in ``adapter_dir``)."""
        return self.keeper.kept.step if self.keeper.kept else None

    @property
    def best_value(self) -> float | None:
        return self.keeper.kept.value if self.keeper.kept else None

    def _save_adapter(self, runner, folder: Path) -> None:
        """Write the adapter next to the folder, then swap it in: a crash never leaves half a kept adapter."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.temp_dir_beside(folder)
        model = _unwrap(runner.model)
        try:
            if llava.is_llava_model(model):  # llm_adapter/, visual_encoder_adapter/, projector/
                llava.save_checkpoint(model, tmp)
            else:
                model.llm.save_pretrained(str(tmp), safe_serialization=True)
            atomic.replace_dir(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _await_verdict(self, step: int) -> bool:
        if not self.wait_for_verdict:
            return False
        deadline = time.monotonic() + protocol.VERDICT_TIMEOUT_S
        while time.monotonic() < deadline:
            verdict = protocol.Verdict.read(self.control_path)
            if verdict is not None and verdict.step >= step:
                return verdict.stop
            time.sleep(0.05)
        message = f"no verdict from the sweep for step {step} in {protocol.VERDICT_TIMEOUT_S:.0f}s; training on"
        self._emit(protocol.TrainingWarning(message))
        return False

    def after_train(self, runner) -> None:
        joined = cotrain.leave_thread()
        llm = _unwrap(runner.model).llm
        fused_loss.uninstall(llm.get_base_model() if hasattr(llm, "get_base_model") else llm)
        self._emit(
            protocol.End(
                iter=runner.iter,
                step=self.step,
                best_step=self.best_step,
                best_value=self.best_value,
                stopped_early=self.stopped,
                val_seconds=round(self.val_seconds, 3),
                peak_memory_mb=torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_available() else None,
                adapter=str(self.adapter_dir) if self.adapter_dir.exists() else None,
                joined=joined,
            )
        )
