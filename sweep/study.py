"""The study: check everything, prepare the data once, run Optuna trials, crown the champion.

Order matters: every check (spec, data rows, model directory, base config, a rendered config)
runs before anything is created, so bad input never leaves a half-made study, MLflow run or
work dir behind. Then Optuna runs the trials, with the storage it is given (SQLite by default,
any RDB URL for many workers), and the best trial's adapter becomes a registered model version
with the alias ``champion``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from sweep import data as data_mod
from sweep.gate import best_trial, pareto_trials, promote
from sweep.locks import adapter_removal
from sweep.pool import WorkerPool
from sweep.progress import SweepProgress
from sweep.render import Device, TrialFiles, load_base_config, prompt_template, render
from sweep.slots import CONTEXT_MB, GpuSlots, MemoryModel, ModelShape, visible_gpus
from sweep.space import base_values, first_point, trial_values
from sweep.spec import Spec, SpecError, spec_summary
from sweep.tracking import RACE_MARKERS, Tracker, redact
from sweep.trial import StudyContext, TrialFailed, run_trial

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


@dataclass
class Checked:
    """What `check` proved usable, so `run` needs no second look."""

    spec: Spec
    base_cfg: dict[str, Any]
    base_knobs: dict[str, Any]
    splits: dict[str, list]
    config_text: str


def check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise SpecError(f"model.path: {path} is not a directory; name the local folder of the base model")
    if not (path / "config.json").is_file():
        raise SpecError(f"model.path: {path} has no config.json; expected a Hugging Face model folder")
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((path / f).is_file() for f in tokenizer_files):
        raise SpecError(f"model.path: {path} has no tokenizer (none of {list(tokenizer_files)})")


def needs_remote_code(model_dir: Path) -> bool:
    """Whether a model folder's config asks Transformers to import Python code the folder ships (``auto_map``)."""
    try:
        return "auto_map" in json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def check(spec: Spec, device: Device | None = None) -> Checked:
    """Every check that can fail before training, with nothing written anywhere."""
    check_model_dir(spec.model.path)
    if needs_remote_code(spec.model.path) and not spec.model.trust_remote_code:
        raise SpecError(
            f"model.path: {spec.model.path} ships its own modeling code (config.json auto_map, as InternLM2 does); "
            "set model.trust_remote_code: true if you trust that folder"
        )
    prompt_template(spec.model.template)
    splits = data_mod.split_rows(spec.data)
    if not splits["val"]:
        raise SpecError(f"{spec.data.task}: the validation split is empty")
    base_cfg = load_base_config(spec.base_config)
    knobs = base_values(base_cfg)
    values = trial_values(spec, first_point(spec), knobs)
    if float(values.get("mix_ratio") or 0) > 0 and not splits["general_train"]:
        raise SpecError("mix_ratio: general data is mixed in but data.general is not set")
    if "val/general_loss" in spec.objective.components and not splits["general_val"]:
        raise SpecError(
            "objective: val/general_loss needs held-out general rows; set data.general and data.general_val > 0"
        )
    probe = Path("/nonexistent/xtuner-sweep-check")
    general_val = probe / "general_val.jsonl" if splits["general_val"] else None
    files = TrialFiles(probe / "train.jsonl", probe / "val.jsonl", probe, max(1, len(splits["train"])), general_val)
    text = render(base_cfg, spec, values, files, device or Device(cuda=False))
    return Checked(spec, base_cfg, knobs, splits, text)


def make_sampler(spec: Spec) -> optuna.samplers.BaseSampler:
    s = spec.sampler
    if s.type == "tpe":
        kw = {"n_startup_trials": s.n_startup_trials} if s.n_startup_trials is not None else {}
        return optuna.samplers.TPESampler(seed=s.seed, **kw)
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.type == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed)
    if s.type == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed)
    grid: dict[str, list] = {}
    for name, p in spec.search_space.items():
        if not hasattr(p, "choices"):
            raise SpecError(f"sampler.type grid: search_space.{name} must be categorical (a grid needs choices)")
        grid[name] = list(p.choices)
    return optuna.samplers.GridSampler(grid, seed=s.seed)


def make_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if spec.objective.multi:
        if p.type != "none" and "pruner" in spec.model_fields_set:
            log.warning("pruner: Optuna cannot prune a multi-objective study; trials run to the end")
        return optuna.pruners.NopPruner()
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.type == "percentile":
        return optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.eval_every)
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.eval_every)
    return optuna.pruners.NopPruner()


def detect_device() -> Device:
    import torch

    if torch.cuda.is_available():
        return Device(cuda=True, n_gpus=torch.cuda.device_count())
    return Device(cuda=False)


def make_storage(url: str, heartbeat: int | None = None, tracking_uri: str | None = None):
    """An Optuna RDB storage; with heartbeats, trials of dead workers are failed and queued again."""
    if not url.startswith(("sqlite", "postgresql", "mysql", "oracle", "mssql")):
        return url  # e.g. a journal storage URL: Optuna resolves it
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {
            "heartbeat_interval": heartbeat,
            "grace_period": 2 * heartbeat,
            "heartbeat_stale_trial_callback": _StaleTrial(tracking_uri),
        }
    if url.startswith("sqlite"):
        return _SQLiteStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}, **kwargs)
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)


class _SQLiteStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage on SQLite, with queued trials claimed one at a time.

    Optuna claims a queued trial (WAITING -> RUNNING) with ``SELECT ... FOR UPDATE``, which SQLite
    ignores: two threads of ``--n-jobs`` (or two processes) can both claim the same enqueued trial and
    train it twice in one work dir (optuna/optuna#4002; seen on the H200 benchmark, and reproduced
    by tests/test_study_storage.py). Claims here take an exclusive file lock beside the database, so
    the second claimant reads the trial after the first committed, finds it RUNNING and takes the next.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        path = url.split(":///", 1)[1] if ":///" in url else ""
        self._claims = Path(path + ".claims") if path and path != ":memory:" else None
        self._thread_claims = threading.Lock()  # an in-memory database: one process, threads only

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_thread_claims", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._thread_claims = threading.Lock()

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        if state != TrialState.RUNNING:
            return super().set_trial_state_values(trial_id, state, values)
        if self._claims is None:
            with self._thread_claims:
                return super().set_trial_state_values(trial_id, state, values)
        with self._claims.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one open file per call: threads exclude each other too
            try:
                return super().set_trial_state_values(trial_id, state, values)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class _StaleTrial:
    """A trial whose worker died: queue it again (Optuna's retry callback) and end its MLflow run as KILLED."""

    def __init__(self, tracking_uri: str | None) -> None:
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.retry(study, trial)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and self.tracking_uri:
            tracker = Tracker(self.tracking_uri)
            tracker.set_tags(run_id, {"state": "FAIL", "reason": "worker lost (no heartbeat)"})
            tracker.finish(run_id, "KILLED")
        log.warning("trial %d: its worker stopped sending heartbeats; failed and queued again", trial.number)


def open_study(spec: Spec, storage, create: bool = True) -> optuna.Study:
    try:
        if not create:
            return optuna.load_study(study_name=spec.study, storage=storage)
        return optuna.create_study(
            study_name=spec.study,
            storage=storage,
            directions=spec.objective.directions,
            sampler=make_sampler(spec),
            pruner=make_pruner(spec),
            load_if_exists=True,
        )
    except (KeyError, optuna.exceptions.StorageInternalError) as err:
        raise SpecError(f"storage {_url(storage)}: {err}") from None


def _url(storage: Any) -> str:
    return redact(storage if isinstance(storage, str) else getattr(storage, "url", str(storage)))


def connect_storage(url: str, heartbeat: int | None, tracking_uri: str | None):
    """Open the storage or fail with exit-code-2 clarity, before anything is created."""
    for attempt in range(4):
        try:
            return make_storage(url, heartbeat, tracking_uri)
        except Exception as err:  # noqa: BLE001 - any driver's error means the same to the user
            text = str(err)
            if attempt < 3 and any(marker in text for marker in RACE_MARKERS):
                time.sleep(1 + attempt)  # workers that start together race to create the tables
                continue
            first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
            raise SpecError(f"storage {redact(url)}: cannot be reached: {first}") from None


def run(spec: Spec, opts: RunOptions) -> dict[str, Any]:
    """Run (or continue) the study; returns the report of `sweep report --json`."""
    device = detect_device()
    checked = check(spec, device)
    root = opts.work_dir.resolve() / spec.study
    owner = _check_work_dir(root, opts.storage)
    storage = connect_storage(opts.storage, opts.heartbeat, opts.tracking_uri)
    study = open_study(spec, storage)
    root.mkdir(parents=True, exist_ok=True)
    owner.write_text(_storage_id(opts.storage) + "\n")
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

    slots = memory = None
    n_jobs = opts.n_jobs or 1
    if device.cuda:
        slots, memory, n_jobs = _gpu_slots(spec, checked, opts)
    threads = None if device.cuda else max(1, (os.cpu_count() or 1) // max(1, n_jobs))
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
        threads=threads,
        slots=slots,
        memory=memory,
        pool=_worker_pool(spec, root, slots, memory),
    )
    n_trials = opts.n_trials or spec.n_trials
    progress = ctx.progress = SweepProgress(n_trials, spec.objective.primary, console=opts.console)
    log.info(
        "study %s: %d trial(s) to run, %d job(s), storage %s, tracking %s, work dir %s",
        spec.study, n_trials, n_jobs, redact(opts.storage), redact(opts.tracking_uri), root,
    )  # fmt: skip
    status = "FAILED"
    registered = None
    ran: Counter[str] = Counter()  # how this process's trials ended (other workers' are not ours to report)
    callbacks: list = [progress, lambda _study, trial: ran.update([trial.state.name])]
    if spec.keep_adapters:
        name = spec.registered_model_name
        callbacks.append(_AdapterBudget(spec.keep_adapters, champion_run=lambda: _champion_run(tracker, name)))
    try:
        with progress:
            study.optimize(
                lambda trial: run_trial(trial, ctx),
                n_trials=n_trials,
                timeout=opts.timeout or spec.timeout,
                n_jobs=n_jobs,
                catch=(TrialFailed,),
                gc_after_trial=False,
                callbacks=callbacks,
            )
        try:
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
        if ctx.pool is not None:
            ctx.pool.close()
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
    return WorkerPool(root / "workers", slots, idle_mb)


def _gpu_slots(spec: Spec, checked: Checked, opts: RunOptions) -> tuple[GpuSlots, MemoryModel, int]:
    """GPU slots for the visible (or chosen) GPUs, and how many trials to run at once."""
    try:
        gpus = visible_gpus(opts.gpus)
    except ValueError as err:
        raise SpecError(str(err)) from None
    if not gpus:  # no nvidia-smi: trust torch
        import torch

        gpus = {i: torch.cuda.get_device_properties(i).total_memory / 2**20 for i in range(torch.cuda.device_count())}
    if spec.gpus_per_trial > len(gpus):
        raise SpecError(f"gpus_per_trial: {spec.gpus_per_trial} GPUs per trial, but only {len(gpus)} visible")
    slots = GpuSlots(gpus, opts.trials_per_gpu)
    memory = MemoryModel(ModelShape.from_dir(spec.model.path, spec.model.quantize))
    values = trial_values(spec, first_point(spec), checked.base_knobs)
    need = memory.estimate(int(values["batch_size"]), int(values["max_length"]))
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


def _champion_run(tracker: Tracker, name: str) -> str | None:
    """The run of the version ``champion`` points to now (another worker or study may have moved it)."""
    mv = tracker.champion(name)
    return mv.run_id if mv is not None else None


class _AdapterBudget:
    """Keep the best ``keep`` trials whole, and every Pareto trial and the champion; thin out the rest.

    A finished trial outside them keeps its config, metric stream, logs and ``data.json``, and
    loses its adapter (still in MLflow as an artifact of its run), its ``.pth`` checkpoints (which
    nothing reads once its adapter is saved; gigabytes for a large model) and its copies of the
    training rows where the study's data digest proves ``sweep.data.remake`` gives them back.
    Runs as an Optuna callback, after a trial's result is recorded, and touches COMPLETE and PRUNED
    trials only: a RUNNING trial's files are in use, a FAILED one's are kept to find out why.
    Ranking is by the primary objective. Workers of one study share the work dir, so an adapter
    is removed only under its exclusive lock (a gate registering or scoring it holds it shared,
    and then it stays), and the champion is read after those locks are taken, each time: a gate
    that moved the alias to one of them has finished by then, and the new champion is kept.
    """

    def __init__(self, keep: int, champion_run: Callable[[], str | None] | None = None) -> None:
        self.keep = keep
        self.champion_run = champion_run or (lambda: None)

    def __call__(self, study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        finished = study.get_trials(deepcopy=False, states=states)
        with_adapter = [t for t in finished if _has_adapter(t)]
        sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
        ranked = sorted(with_adapter, key=lambda t: (t.state != optuna.trial.TrialState.COMPLETE, sign * _score(t)))
        pareto = {t.number for t in pareto_trials(study)} if len(study.directions) > 1 else set()
        kept = {t.number for t in ranked[: self.keep]} | pareto
        doomed = [t for t in finished if t.number not in kept]
        if not doomed:
            return
        with ExitStack() as locks:
            mine = [t for t in doomed if not _has_adapter(t) or locks.enter_context(adapter_removal(_adapter(t)))]
            for number in sorted({t.number for t in doomed} - {t.number for t in mine}):
                log.info("trial %d: adapter in use by a gate; kept for now (keep_adapters)", number)
            if not mine:
                return
            try:
                champion = self.champion_run()
            except Exception as err:  # noqa: BLE001 - cannot tell which trial is the champion's: remove nothing
                log.warning("keep_adapters: nothing removed this time: %s", err)
                return
            for t in mine:
                if champion is None or t.user_attrs.get("mlflow_run_id") != champion:
                    self._thin_out(t)

    def _thin_out(self, t: optuna.trial.FrozenTrial) -> None:
        """Remove what a trial that is not kept no longer needs; already-thin trials cost a directory scan."""
        import shutil

        adapter = t.user_attrs.get("adapter_path")
        if adapter and Path(adapter).is_dir():
            shutil.rmtree(adapter, ignore_errors=True)
            log.info("trial %d: adapter removed from disk (kept in MLflow); keep_adapters=%d", t.number, self.keep)
        work = Path(t.user_attrs["work_dir"]) if t.user_attrs.get("work_dir") else None
        if work is None or not work.is_dir():
            return
        freed, removed = 0, []
        for ckpt in [*work.rglob("*.pth"), work / "last_checkpoint"]:  # last_checkpoint names the last .pth
            try:
                size = ckpt.stat().st_size
                ckpt.unlink()
            except FileNotFoundError:  # not written, or another thread's callback was first
                continue
            freed += size
            removed.append(ckpt.name)
        removed += data_mod.drop_copies(work)
        if removed:
            log.info("trial %d: removed %s (%.1f MB of checkpoints); not among keep_adapters=%d",
                     t.number, ", ".join(sorted(removed)), freed / 2**20, self.keep)  # fmt: skip


def _adapter(t: optuna.trial.FrozenTrial) -> Path:
    return Path(t.user_attrs["adapter_path"])


def _has_adapter(t: optuna.trial.FrozenTrial) -> bool:
    return bool(t.user_attrs.get("adapter_path")) and _adapter(t).is_dir()


def _score(t: optuna.trial.FrozenTrial) -> float:
    value = t.values[0] if t.values else t.user_attrs.get("best_value")
    return float("inf") if value is None else float(value)


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
                "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                **{f"param.{k}": v for k, v in t.params.items()},
            }
        )
    if rows:
        import pandas as pd

        tracker.client.log_table(parent, pd.DataFrame(rows), "trials.json")
    best = best_trial(study, spec.objective)
    if best is None:
        return
    metrics = [(f"best/{name}", v, best.number) for name, v in zip(spec.objective.names, best.values, strict=True)]
    tracker.log_metrics(parent, metrics)
    tags = {"best_trial": best.number, "best_run_id": best.user_attrs.get("mlflow_run_id", "")}
    if pareto:
        tags["pareto_trials"] = ",".join(str(n) for n in sorted(pareto))
    tracker.set_tags(parent, tags)
