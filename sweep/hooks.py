"""Code that runs inside the XTuner training process: the validation metric and the sweep hook.

The hook places validation at fixed counts of training samples seen (``eval_every``), so trials
with different batch sizes, epochs and packing report on the same x-axis, which is what Optuna's
pruners compare and what MLflow plots. It streams exact (unsmoothed) values to a JSON-lines file
the sweep process reads, saves the adapter whenever the objective improves, and, after each
validation point, waits for the sweep's verdict (go on, or stop because the trial was pruned).
Values come from the metric itself, never from mmengine's logs, which smooth every key that
contains "loss".
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from mmengine.dist import all_gather_object, broadcast_object_list, get_world_size, is_main_process
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook

from objectives import WEIGHTED, weighted
from objectives.loss import mean_loss, token_loss_sum
from sweep import atomic
from sweep.amp import training_autocast, trains_under_autocast
from sweep.launcher import CONTROL_ENV


class ValLossMetric(BaseMetric):
    """``val/loss``: token-mean cross-entropy over assistant tokens of unpacked validation rows."""

    default_prefix = "val"

    def process(self, data_batch: Any, data_samples: Any) -> None:
        labels = data_batch["data"]["labels"]
        for i, sample in enumerate(data_samples):
            self.results.append(token_loss_sum(sample["logits"], labels[i]))

    def compute_metrics(self, results: list) -> dict[str, float]:
        return {"loss": mean_loss(results)}


def _unwrap(model: Any) -> Any:
    while not hasattr(model, "llm"):
        inner = getattr(model, "module", None) or getattr(model, "model", None)
        if inner is None:
            raise AttributeError(f"no XTuner model with an .llm inside {type(model).__name__}")
        model = inner
    return model


def _first_turn(messages: list[dict[str, str]]) -> tuple[str, str]:
    """The question (user text before the first answer) and that answer, as openai_map_fn pairs them."""
    question = []
    for m in messages:
        if m["role"] == "assistant":
            return "".join(question), m["content"]
        if m["role"] == "user":
            question.append(m["content"])
    return "".join(question), ""


def keep_frozen_weights_16bit(llm: Any) -> int:
    """Put the frozen weights under LoRA layers back in the 16-bit dtype they were loaded in.

    XTuner prepares every LoRA model with PEFT's ``prepare_model_for_kbit_training``, quantized or
    not, and it upcasts every bf16/fp16 weight to fp32: twice the memory, and under AMP every linear
    call casts its weight back to 16 bits (a quarter of a step's GPU time with the dtype copies,
    docs/benchmarks.md). Autocast multiplies with the same 16-bit values either way, so the math is
    unchanged; each weight is checked to round-trip exactly before it is replaced. LoRA parameters,
    norms and embeddings stay fp32, so activations are fp32: only call this when every forward pass
    runs under autocast (training's and ``SweepHook``'s validation). Returns the number of weights
    (elements) now held in 16 bits.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    dtype = getattr(llm.config, "torch_dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return 0  # loaded in fp32 (the CPU): nothing to give back
    done = 0
    for module in llm.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer()
        for param in (getattr(base, "weight", None), getattr(base, "bias", None)):
            if param is None or param.requires_grad or param.dtype != torch.float32:
                continue
            low = param.data.to(dtype)
            if torch.equal(low.float(), param.data):  # exact: these values came from the 16-bit checkpoint
                param.data = low
                done += param.numel()
    return done


class SweepHook(Hook):
    """Validation schedule by samples seen, metric stream, best adapter, and the prune handshake."""

    priority = "LOW"

    def __init__(
        self,
        metric: str,
        rule: str,
        eval_every: int,
        n_train_rows: int,
        stream: str,
        control: str,
        adapter_dir: str,
        generation: dict[str, Any] | None = None,
        general_val: dict[str, Any] | None = None,
        weights: dict[str, float] | None = None,
        ack_timeout: float = 900.0,
        frozen_16bit: bool = False,
        baseline: str | None = None,
    ) -> None:
        self.metric = metric
        self.general_val = general_val
        self.weights = weights
        self.better = (lambda a, b: a < b) if rule == "less" else (lambda a, b: a > b)
        self.eval_every = eval_every
        self.n_train_rows = n_train_rows
        self.stream_path = Path(stream)
        self.control_path = Path(control)
        self.adapter_dir = Path(adapter_dir)
        self.ack_timeout = ack_timeout
        self.wait_for_verdict = os.environ.get(CONTROL_ENV) == "1"
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.step = 0
        self.stopped = False
        self.generation = generation
        self.val_seconds = 0.0
        self.frozen_16bit = frozen_16bit
        self.baseline = Path(baseline) if baseline else None
        self.shares_baseline = False  # decided at step 0: LoRA B all zero, so the model is its base

    # -- the x-axis ---------------------------------------------------------------------------
    def samples_seen(self, iters_done: int) -> int:
        """Training rows seen after ``iters_done`` iterations, counted in rows of the trial's data."""
        return round(iters_done * self.n_train_rows / self.iters_per_epoch)

    def _emit(self, event: dict[str, Any]) -> None:
        if is_main_process():
            with self.stream_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")

    def before_train(self, runner) -> None:
        self.iters_per_epoch = len(runner.train_dataloader)
        self.max_iters = runner.max_iters
        self.next_point = self.eval_every
        self.final_step = self.samples_seen(self.max_iters)
        amp = trains_under_autocast(runner.optim_wrapper)
        # ValLoop wraps each step in autocast(enabled=fp16), which with False switches _validate's autocast
        # off; enabled, it keeps the dtype of the autocast it runs inside (training's).
        runner.val_loop.fp16 = amp
        in_16bit = keep_frozen_weights_16bit(_unwrap(runner.model).llm) if self.frozen_16bit and amp else 0
        if in_16bit and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the fp32 copies just dropped
        self._emit(
            {
                "kind": "start",
                "max_iters": self.max_iters,
                "iters_per_epoch": self.iters_per_epoch,
                "final_step": self.final_step,
                "world_size": get_world_size(),
                "frozen_weights_16bit": in_16bit,
                "time": time.time(),
            }
        )
        if self.general_val:
            self.general_loader = runner.build_dataloader(self.general_val)
        if self.generation:
            from xtuner.registry import BUILDER

            self.tokenizer = BUILDER.build(self.generation["tokenizer"])
            lines = Path(self.generation["val_file"]).read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
            pairs = [_first_turn(r["messages"]) for r in rows[: self.generation["max_rows"]]]
            self.questions = [q for q, _ in pairs]
            self.references = [a for _, a in pairs]

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
        if torch.cuda.is_available():
            memory_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        loss = (outputs or {}).get("loss")
        event = {
            "kind": "train",
            "iter": done,
            "step": self.step,
            "train/loss": float(loss) if loss is not None else None,
            "train/lr": float(runner.optim_wrapper.get_lr()["lr"][0]),
            "perf/tokens_per_sec": tokens / seconds if seconds > 0 else 0.0,
            "perf/memory_mb": memory_mb,
            "perf/iter_seconds": seconds,
        }
        self._emit(event)
        if done >= self.max_iters:
            self._validate(runner, self.final_step)
        elif self.step >= self.next_point:
            point = self.step - self.step % self.eval_every
            self.next_point = point + self.eval_every
            self._validate(runner, point)

    # -- validation and the verdict -----------------------------------------------------------
    def _validate(self, runner, step: int) -> None:
        self._pending_step = step
        started = time.perf_counter()
        # Validation draws no random numbers from training's streams (a data loader's iterator takes
        # one): a trial trains the same whether a point was measured, read from the study, or skipped.
        # Every forward pass of validation (loss, general loss, generation, probes) runs under training's
        # autocast: with frozen weights in 16 bits and fp32 activations, a bare forward pass cannot multiply.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), training_autocast(runner.optim_wrapper):
            if step == 0:
                self.shares_baseline = self._baseline_applies(runner)
            cached = self._cached_baseline() if step == 0 else None
            if cached is not None:  # the untrained point, as another trial of this study measured it
                self._record_point(runner, step, cached["metrics"], cached.get("samples"), cached=True)
            else:
                runner.val_loop.run()
        runner.model.train()  # ValLoop leaves the model in eval mode: dropout would stay off until the next epoch
        self.val_seconds += time.perf_counter() - started
        stop = [self._await_verdict(step) if is_main_process() and step > 0 else False]
        if get_world_size() > 1:
            broadcast_object_list(stop)
        if stop[0] and runner.iter + 1 < self.max_iters:
            runner.train_loop.stop_training = True
            self.stopped = True

    def after_val_epoch(self, runner, metrics: dict[str, float] | None = None) -> None:
        metrics = metrics if metrics is not None else {}
        step = getattr(self, "_pending_step", self.step)
        # Added before CheckpointHook (lower priority) reads the metrics for save_best.
        if self.general_val:
            metrics["val/general_loss"] = self._general_loss(runner)
        samples = self._generate(runner, step, metrics) if self.generation else None
        if step == 0 and self.shares_baseline:
            self._store_baseline(metrics, samples)
        self._record_point(runner, step, metrics, samples)

    def _record_point(self, runner, step: int, metrics: dict[str, float], samples, cached: bool = False) -> None:
        """Stream one validation point (and its sample answers); keep the adapter if it is the best yet."""
        if samples:
            self._emit({"kind": "samples", "step": step, "rows": samples})
        if self.weights:
            metrics[WEIGHTED] = weighted(metrics, self.weights)
        value = metrics.get(self.metric)
        if value is not None and value == value and (self.best_value is None or self.better(value, self.best_value)):
            self.best_value, self.best_step = float(value), step
            if is_main_process():
                self._save_adapter(runner)
        self._emit(
            {
                "kind": "val",
                "step": step,
                "iter": runner.iter + 1,
                **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                "best_step": self.best_step,
                **({"baseline": "cached"} if cached else {}),
                "time": time.time(),
            }
        )

    # -- the untrained point, once per study -------------------------------------------------------
    def _baseline_applies(self, runner) -> bool:
        """Whether this trial's step-0 point is the study's shared one: LoRA B starts at zero, so the
        model computes exactly what the base model does (same validation data, same model: same key)."""
        if self.baseline is None or get_world_size() > 1:
            return False
        llm = _unwrap(runner.model).llm
        b = [linear.weight for m in llm.modules() if hasattr(m, "lora_B") for linear in m.lora_B.values()]
        return bool(b) and float(torch.stack([w.abs().max() for w in b]).max()) == 0.0  # one device sync

    def _cached_baseline(self) -> dict[str, Any] | None:
        if not self.shares_baseline:
            return None
        try:
            return json.loads(self.baseline.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None  # the first trial of the study measures it

    def _store_baseline(self, metrics: dict[str, float], samples) -> None:
        if not is_main_process():
            return
        point = {"metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                 "samples": samples}  # fmt: skip
        self.baseline.parent.mkdir(parents=True, exist_ok=True)
        # trials that measured it at the same time write the same values; each through a temp file of its own
        atomic.write_text(self.baseline, json.dumps(point, ensure_ascii=False))

    @torch.no_grad()
    def _general_loss(self, runner) -> float:
        """``val/loss`` on held-out general chat rows: the same metric, a second loader (mmengine has one)."""
        model = runner.model
        model.eval()
        parts: list[tuple[float, int]] = []
        for data_batch in self.general_loader:
            outputs = model.val_step(data_batch)
            labels = data_batch["data"]["labels"]
            parts += [token_loss_sum(out["logits"], labels[i]) for i, out in enumerate(outputs)]
        if get_world_size() > 1:
            parts = [p for rank_parts in all_gather_object(parts) for p in rank_parts]
        return mean_loss(parts)

    def _generate(self, runner, step: int, metrics: dict[str, float]) -> list[dict] | None:
        from objectives.rouge import rouge_l
        from sweep.generation import generate_answers

        gen = self.generation
        score = [None]
        rows = None
        if is_main_process():
            llm = _unwrap(runner.model).llm
            args = dict(template=gen["template"], system=gen["system"], max_new_tokens=gen["max_new_tokens"])
            if gen["rouge"] and self.questions:
                answers = generate_answers(llm, self.tokenizer, questions=self.questions, **args)
                score = [rouge_l(answers, self.references)]
            if gen["probes"]:
                answers = generate_answers(llm, self.tokenizer, questions=gen["probes"], **args)
                rows = [{"step": step, "question": q, "answer": a} for q, a in zip(gen["probes"], answers, strict=True)]
        if get_world_size() > 1:
            broadcast_object_list(score)
        if score[0] is not None:
            metrics["val/rouge_l"] = float(score[0])
        return rows

    def _save_adapter(self, runner) -> None:
        """Write the adapter next to the folder, then swap it in: a crash never leaves half a best adapter."""
        tmp = atomic.temp_dir_beside(self.adapter_dir)
        try:
            _unwrap(runner.model).llm.save_pretrained(str(tmp), safe_serialization=True)
            atomic.replace_dir(tmp, self.adapter_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _await_verdict(self, step: int) -> bool:
        if not self.wait_for_verdict:
            return False
        deadline = time.monotonic() + self.ack_timeout
        while time.monotonic() < deadline:
            try:
                verdict = json.loads(self.control_path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                verdict = None
            if verdict and verdict.get("step", -1) >= step:
                return bool(verdict.get("stop"))
            time.sleep(0.05)
        message = f"no verdict from the sweep for step {step} in {self.ack_timeout:.0f}s; training on"
        self._emit({"kind": "warning", "message": message})
        return False

    def after_train(self, runner) -> None:
        self._emit(
            {
                "kind": "end",
                "iter": runner.iter,
                "step": self.step,
                "best_step": self.best_step,
                "best_value": self.best_value,
                "stopped_early": self.stopped,
                "val_seconds": round(self.val_seconds, 3),
                # what the GPU slots plan with: the allocator's reserve, not only live tensors
                "peak_memory_mb": torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_available() else None,
                "adapter": str(self.adapter_dir) if self.adapter_dir.exists() else None,
                "time": time.time(),
            }
        )
