"""The study: a short run from a spec to a champion, built on the rooms around it.

Start the training workers (when the spec alone says how many) and check everything (``preflight``: a run
the checks refuse leaves nothing behind, its early workers ended and their logs removed), prepare the data once
(``data``), open Optuna's storage (``storage``) and the MLflow runs (``registry.tracking``), run the
trials (``trial.run``), each on its GPU slot (``trial.placement``), then register the best adapter
behind the test-set gate (``registry.gate``) with the alias ``champion``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from sweep import data as data_mod
from sweep import speed
from sweep.callbacks import AdapterBudget, WarmModelLogging, champion_run
from sweep.knobs import trial_values
from sweep.preflight import Checked, check, detect_device
from sweep.progress import SweepProgress
from sweep.ranking import best_trial, pareto_trials
from sweep.registry.gate import promote
from sweep.registry.tracking import Tracker, redact
from sweep.search import first_point
from sweep.spec import Spec, SpecError, spec_summary
from sweep.storage import connect_storage, open_study
from sweep.trial import mps
from sweep.trial.placement import (
    CONTEXT_MB,
    GpuSlots,
    MemoryModel,
    ModelShape,
    checkpointing,
    usable_cpus,
    visible_gpus,
)
from sweep.trial.pool import WorkerPool
from sweep.trial.run import StudyContext, TrialFailed, run_trial
from sweep.xtuner.render import Device

log = logging.getLogger("sweep")


@dataclass
class RunOptions:
    storage: str
    tracking_uri: str
    work_dir: Path
    n_trials: int | None = None
    n_jobs: int | None = None  # trials at once; None: as many as the GPU slots hold (1 on the CPU)
    gpus: list[int] | None = None  # None: every visible GPU
    trials_per_gpu: int | None = None  # None: as many as fit in memory (at most 8)
    timeout: float | None = None
    heartbeat: int = 60  # seconds; a trial silent for 2x this long is failed and queued again
    console: Any = None  # a rich Console for the live view; None: stderr (live only if it is a terminal)


def run(spec: Spec, opts: RunOptions) -> dict[str, Any]:
    """Run (or continue) the study; returns the report of `sweep report --json`."""
    root = opts.work_dir.resolve() / spec.study
    owner = _check_work_dir(root, opts.storage)
    plan = None
    try:
        plan = _early_plan(spec, opts, root)
        device = detect_device()
        checked = check(spec, device)
        storage = connect_storage(opts.storage, opts.heartbeat, opts.tracking_uri)
        study = open_study(spec, storage)
    except BaseException:
        if plan is not None:
            plan.end(discard=True)
        raise
    try:
        root.mkdir(parents=True, exist_ok=True)
        owner.write_text(_storage_id(opts.storage) + "\n")
        if plan is not None and plan.cuda != device.cuda:
            log.warning(
                "nvidia-smi lists GPUs but torch does not see them: the workers started for them end, the trials run on"
                " the CPU"
                if plan.cuda
                else "torch sees GPUs that nvidia-smi did not list: the workers started"
                " for the CPU end, the trials are planned for the GPUs"
            )
            plan.end(discard=True)
            plan = None
        if plan is None:
            values = trial_values(spec, first_point(spec), checked.base_knobs)
            plan = _plan(spec, opts, _cuda_gpus(opts) if device.cuda else {}, values)
            _start_workers(spec, root, plan)
        return _run(spec, opts, device, checked, root, study, plan)
    finally:
        if plan is not None:
            plan.end()


def _early_plan(spec: Spec, opts: RunOptions, root: Path) -> _Plan | None:
    """The plan, its workers started, before the checks (which import XTuner, Transformers and torch: seconds) when
    the spec alone says how many: the GPUs from nvidia-smi and the first point's batch size and max_length from the
    spec. Their cold start (imports) then runs beside the sweep's own. None: they start after the checks."""
    if not (spec.speed.resident_workers and spec.gpus_per_trial == 1 and (spec.model.path / "config.json").is_file()):
        return None
    values = {**spec.fixed, **first_point(spec)}
    if not isinstance(values.get("batch_size"), int) or not isinstance(values.get("max_length"), int):
        return None  # the memory plan needs the base config's values
    try:
        gpus = visible_gpus(opts.gpus)
        plan = _plan(spec, opts, gpus, values) if gpus or opts.gpus is None else None
    except Exception:  # noqa: BLE001 - a bad --gpus, config.json or spec: the checks say what is wrong
        return None
    if plan is not None:
        _start_workers(spec, root, plan)
    return plan


def _plan(spec: Spec, opts: RunOptions, gpus: dict[int, float], values: dict[str, Any]) -> _Plan:
    """How many trials run at once on ``gpus`` (none: the CPU) for a first trial of ``values``."""
    plan = _Plan(opts.n_jobs or 1, opts.n_trials or spec.n_trials)
    if gpus:
        plan.slots, plan.memory, plan.n_jobs = _gpu_plan(spec, opts, gpus, values)
    plan.threads = None if gpus else max(1, usable_cpus() // max(1, plan.n_jobs))
    return plan


def _start_workers(spec: Spec, root: Path, plan: _Plan) -> None:
    """The plan's resident workers, started now: their imports and CUDA start beside what the sweep does next."""
    plan.pool = _worker_pool(spec, root, plan.slots, plan.memory)
    if plan.pool is None:
        return
    try:
        plan.mps = _mps_server(spec, plan)
        plan.pool.env = plan.mps.env if plan.mps is not None else {}
        gpus = sorted(plan.slots.total) if plan.cuda else []
        plan.pool.prewarm(_workers(plan, plan.pool.at_once), gpus, plan.threads)
    except BaseException:
        plan.end(discard=True)  # a worker that could not start: none of them stays
        raise


def _workers(plan: _Plan, per_worker: int) -> int:
    """How many workers the plan's trials at once need, ``per_worker`` trials each, at least one per GPU."""
    trials = min(plan.n_jobs, plan.n_trials)
    gpus = len(plan.slots.total) if plan.cuda else 0
    return trials if per_worker == 1 else min(trials, max(gpus, -(-trials // per_worker)))


def _mps_server(spec: Spec, plan: _Plan) -> mps.MpsServer | None:
    """A private MPS server for the workers when trials share a GPU (``speed.mps``; sweep.trial.mps says why)."""
    if spec.speed.mps == "off" or not plan.cuda:
        return None
    gpus = sorted(plan.slots.total)
    if spec.speed.mps == "auto" and _workers(plan, spec.speed.trials_per_worker) <= len(gpus):
        return None  # no GPU is shared by two processes
    try:
        return mps.start(gpus)
    except mps.MpsUnavailable as err:
        if spec.speed.mps == "on":
            raise SpecError(f"speed.mps is on, but no MPS server could be started: {err}") from None
        log.info("MPS: not used (%s); trials sharing a GPU take turns on it", err)
        return None


@dataclass
class _Plan:
    """How this process runs its trials: how many at once, on which GPU slots, in which workers."""

    n_jobs: int
    n_trials: int
    threads: int | None = None
    slots: GpuSlots | None = None
    memory: MemoryModel | None = None
    pool: WorkerPool | None = None
    mps: mps.MpsServer | None = None

    def end(self, discard: bool = False) -> None:
        """End the workers (``discard``: with their logs, nothing ran), then the MPS server they used."""
        try:
            if self.pool is not None:
                self.pool.discard() if discard else self.pool.close()
        finally:
            if self.mps is not None:
                self.mps.stop()

    @property
    def cuda(self) -> bool:
        return self.slots is not None


def _run(spec: Spec, opts: RunOptions, device: Device, checked: Checked, root: Path, study: optuna.Study,
         plan: _Plan) -> dict[str, Any]:  # fmt: skip
    prepared = data_mod.prepare(spec.data, root / "data")
    saved = study.user_attrs.get("data_digest")
    if saved and saved != prepared.digest:
        raise SpecError(f"study {spec.study}: was run on data {saved}, this data is {prepared.digest}")
    study.set_user_attr("data_digest", prepared.digest)
    study.set_user_attr("spec", spec_summary(spec))
    study.set_user_attr("work_dir", str(root))

    tracker = Tracker(opts.tracking_uri)
    experiment_id = tracker.experiment(spec.study)
    params = {
        "base_config": spec.base_config,
        "model_path": str(spec.model.path),
        "template": spec.model.template,
        "quantize": spec.model.quantize,
        "objective": spec.objective.describe(),
        "sampler": spec.sampler.type,
        "pruner": spec.pruner.type,
        "eval_every": spec.eval_every,
        "search_space": yaml.safe_dump(spec_summary(spec)["search_space"], sort_keys=True),
        "data_digest": prepared.digest,
        **{f"data_rows.{k}": v for k, v in prepared.counts.items()},
    }
    parent = tracker.parent_run(
        experiment_id, spec.study, params, yaml.safe_dump(spec_summary(spec), allow_unicode=True)
    )
    tracker.set_tags(
        parent, {"optuna_storage": redact(opts.storage), **{f"data_hash.{k}": v for k, v in prepared.hashes.items()}}
    )
    study.set_user_attr("mlflow_parent_run_id", parent)
    tracker.log_metrics(parent, [(name, value, 0) for name, value in checked.findings.metrics().items()])
    tracker.log_dict(parent, checked.findings.as_dict(), "data_checks.json")

    ctx = StudyContext(
        spec=spec,
        base_cfg=checked.base_cfg,
        base_knobs=checked.base_knobs,
        data=prepared,
        root=root,
        device=device,
        tracker=tracker,
        experiment_id=experiment_id,
        parent_run_id=parent,
        threads=plan.threads,
        slots=plan.slots,
        memory=plan.memory,
        pool=plan.pool,
    )
    progress = ctx.progress = SweepProgress(plan.n_trials, spec.objective.primary, console=opts.console)
    log.info(
        "study %s: %d trial(s) to run, %d job(s), storage %s, tracking %s, work dir %s",
        spec.study, plan.n_trials, plan.n_jobs, redact(opts.storage), redact(opts.tracking_uri), root,
    )  # fmt: skip
    status = "FAILED"
    registered = None
    ran: Counter[str] = Counter()  # how this process's trials ended (other workers' are not ours to report)
    warm = WarmModelLogging(tracker)
    callbacks: list = [progress, lambda _study, trial: ran.update([trial.state.name]), warm]
    if spec.keep_adapters:
        name = spec.registered_model_name
        callbacks.append(AdapterBudget(spec.keep_adapters, champion_run=lambda: champion_run(tracker, name)))
    try:
        with progress:
            study.optimize(
                lambda trial: run_trial(trial, ctx),
                n_trials=plan.n_trials,
                timeout=opts.timeout or spec.timeout,
                n_jobs=plan.n_jobs,
                catch=(TrialFailed,),
                gc_after_trial=False,
                callbacks=callbacks,
            )
        try:
            plan.end()  # the gate loads its own model: the idle workers' GPU memory (and MPS's) is given back first
            if warm.thread is not None:  # a short sweep: the scan may still run; logging the champion would scan again
                warm.thread.join(timeout=60)
            gated = promote(study, spec, tracker, prepared.folder, parent)
            registered = gated.as_dict() if gated else None
        except Exception as err:  # noqa: BLE001 - the trials are saved; only registering them failed
            log.error("study %s: the test gate failed (%s); run `sweep promote %s` to try again", spec.study,
                      str(err).splitlines()[0] if str(err) else type(err).__name__, spec.study)  # fmt: skip
            registered = {"error": f"{type(err).__name__}: {err}"}
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        plan.end()  # the trials' workers end before the summary and the report (run ends the plan again)
        _log_study_summary(study, spec, tracker, parent)
        tracker.finish(parent, status)
    from sweep.report import study_report

    report = study_report(study, spec.objective, registered)
    report["this_run"] = {state: ran.get(state, 0) for state in ("COMPLETE", "PRUNED", "FAIL")}
    return report


def _worker_pool(spec: Spec, root: Path, slots: GpuSlots | None, memory: MemoryModel | None) -> WorkerPool | None:
    """Resident training processes, unless the spec turns them off or every trial spans GPUs."""
    if not spec.speed.resident_workers or spec.gpus_per_trial > 1:
        return None
    # an idle worker holds its base model and a CUDA context; planned as if all of it were fp32 (PEFT's
    # upcast), which overestimates when frozen_weights_16bit put the linear weights back in 16 bits
    idle_mb = CONTEXT_MB + 2 * memory.shape.weights_mb if memory is not None else 0.0
    fork = spec.speed.fork_workers != "off"
    return WorkerPool(root / "workers", slots, idle_mb, at_once=spec.speed.trials_per_worker, fork=fork)


def _cuda_gpus(opts: RunOptions) -> dict[int, float]:
    """The visible (or chosen) GPUs and their memory in MB: nvidia-smi's, else torch's."""
    try:
        gpus = visible_gpus(opts.gpus)
    except ValueError as err:
        raise SpecError(str(err)) from None
    if not gpus:  # no nvidia-smi: trust torch
        import torch

        gpus = {i: torch.cuda.get_device_properties(i).total_memory / 2**20 for i in range(torch.cuda.device_count())}
    return gpus


def _gpu_plan(
    spec: Spec, opts: RunOptions, gpus: dict[int, float], values: dict[str, Any]
) -> tuple[GpuSlots, MemoryModel, int]:
    """The slots of ``gpus`` and how many trials run at once, from the memory a trial of ``values`` needs."""
    if spec.gpus_per_trial > len(gpus):
        raise SpecError(f"gpus_per_trial: {spec.gpus_per_trial} GPUs per trial, but only {len(gpus)} visible")
    slots = GpuSlots(gpus, opts.trials_per_gpu)
    cuda = Device(cuda=True)
    memory = MemoryModel(ModelShape.from_dir(spec.model.path, spec.model.quantize),
                         fused_loss=speed.fused_loss(spec, cuda) != "off",
                         lean=speed.fused_kernels(spec, cuda) and speed.lora_input_16bit(spec, cuda)
                         and not spec.model.quantize)  # measured for 16-bit LoRA only  # fmt: skip
    batch, length = int(values["batch_size"]), int(values["max_length"])
    # planned as the trial will run (with or without activation checkpointing): planned with it where `auto` turns it
    # off, a small first point started workers and threads for trials that never fit
    need = memory.estimate(
        batch, length, checkpointing(spec.speed.activation_checkpointing, memory, slots, batch, length)
    )
    n_jobs = opts.n_jobs or (len(gpus) // spec.gpus_per_trial if spec.gpus_per_trial > 1 else slots.capacity(need))
    log.info(
        "GPUs %s (%s MB); a trial of the first point needs about %.0f MB; %d trial(s) at once",
        sorted(gpus), ",".join(f"{v:.0f}" for v in gpus.values()), need, n_jobs,
    )  # fmt: skip
    return slots, memory, n_jobs


def _storage_id(url: str) -> str:
    """The storage a work dir belongs to: the password hidden, a relative SQLite path made absolute."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = "sqlite:///" + str(Path(url.removeprefix("sqlite:///")).resolve())
    return redact(url)


def _check_work_dir(root: Path, storage: str) -> Path:
    """Trial folders are named by study and number: two storages with a study of the same name must not share them."""
    owner = root / "storage.txt"
    if owner.is_file():
        theirs, ours = owner.read_text().strip(), _storage_id(storage)
        if theirs != ours:
            raise SpecError(
                f"{root}: holds the trials of study {root.name} in storage {theirs}, not {ours}; "
                "give this run another --work-dir (or the same --storage)"
            )
    return owner


def _log_study_summary(study: optuna.Study, spec: Spec, tracker: Tracker, parent: str) -> None:
    rows = []
    pareto = {t.number for t in pareto_trials(study)} if spec.objective.multi else set()
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                **{name: (t.values[i] if t.values else None) for i, name in enumerate(spec.objective.names)},
                "pareto": t.number in pareto,
                "best_step": t.user_attrs.get("best_step"),
                "fit": (t.user_attrs.get("fit") or {}).get("label"),
                "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                **{f"param.{k}": v for k, v in t.params.items()},
            }
        )
    if rows:
        import pandas as pd

        tracker.client.log_table(parent, pd.DataFrame(rows), "trials.json")
    best = best_trial(study)
    if best is None:
        return
    from sweep.report import fit_summary  # report reads the study's spec: imported where it is used, as run() does

    metrics = [(f"best/{name}", v, best.number) for name, v in zip(spec.objective.names, best.values, strict=True)]
    tracker.log_metrics(parent, metrics)
    tags = {"best_trial": best.number, "best_run_id": best.user_attrs.get("mlflow_run_id", ""),
            "fit_suggestion": fit_summary(study)["suggestion"]}  # fmt: skip
    if pareto:
        tags["pareto_trials"] = ",".join(str(n) for n in sorted(pareto))
    tracker.set_tags(parent, tags)
