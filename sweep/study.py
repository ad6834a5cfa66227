"""The study: check everything, prepare the data once, run Optuna trials, crown the champion.

Order matters: every check (spec, data rows, model directory, base config, a rendered config)
runs before anything is created, so bad input never leaves a half-made study, MLflow run or
work dir behind. Then Optuna runs the trials, with the storage it is given (SQLite by default,
any RDB URL for many workers), and the best trial's adapter becomes a registered model version
with the alias ``champion``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from objectives import METRICS
from sweep import data as data_mod
from sweep.render import Device, TrialFiles, load_base_config, prompt_template, render
from sweep.serving import log_chat_model
from sweep.space import base_values, first_point, trial_values
from sweep.spec import Spec, SpecError, spec_summary
from sweep.tracking import RACE_MARKERS, Tracker, redact
from sweep.trial import StudyContext, TrialFailed, run_trial

log = logging.getLogger("sweep")
CHAMPION = "champion"


@dataclass
class RunOptions:
    storage: str
    tracking_uri: str
    work_dir: Path
    n_trials: int | None = None
    n_jobs: int = 1
    timeout: float | None = None
    heartbeat: int = 60  # seconds; a trial silent for 2x this long is failed and queued again


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


def check(spec: Spec, device: Device | None = None) -> Checked:
    """Every check that can fail before training, with nothing written anywhere."""
    if spec.objective.metric not in METRICS:
        raise SpecError(f"objective.metric: {spec.objective.metric!r} is produced by nothing; known: {sorted(METRICS)}")
    check_model_dir(spec.model.path)
    prompt_template(spec.model.template)
    splits = data_mod.split_rows(spec.data)
    if not splits["val"]:
        raise SpecError(f"{spec.data.task}: the validation split is empty")
    base_cfg = load_base_config(spec.base_config)
    knobs = base_values(base_cfg)
    values = trial_values(spec, first_point(spec), knobs)
    if float(values.get("mix_ratio") or 0) > 0 and not splits["general_train"]:
        raise SpecError("mix_ratio: general data is mixed in but data.general is not set")
    probe = Path("/nonexistent/xtuner-sweep-check")
    files = TrialFiles(probe / "train.jsonl", probe / "val.jsonl", probe, max(1, len(splits["train"])))
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
    engine = {"pool_pre_ping": True} if not url.startswith("sqlite") else {"connect_args": {"timeout": 60}}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)


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
            direction=spec.objective.direction,
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
    storage = connect_storage(opts.storage, opts.heartbeat, opts.tracking_uri)
    study = open_study(spec, storage)
    root = opts.work_dir.resolve() / spec.study
    root.mkdir(parents=True, exist_ok=True)
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
        "objective": f"{spec.objective.direction} {spec.objective.metric}",
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

    threads = None if device.cuda else max(1, (os.cpu_count() or 1) // max(1, opts.n_jobs))
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
        gpu_ids=[0] if device.cuda else [],
    )
    n_trials = opts.n_trials or spec.n_trials
    log.info(
        "study %s: %d trial(s) to run, %d job(s), storage %s, tracking %s, work dir %s",
        spec.study, n_trials, opts.n_jobs, redact(opts.storage), redact(opts.tracking_uri), root,
    )  # fmt: skip
    status = "FAILED"
    registered = None
    try:
        study.optimize(
            lambda trial: run_trial(trial, ctx),
            n_trials=n_trials,
            timeout=opts.timeout or spec.timeout,
            n_jobs=opts.n_jobs,
            catch=(TrialFailed,),
            gc_after_trial=False,
            callbacks=[_AdapterBudget(spec.keep_adapters, champion_run=_champion_run(ctx))]
            if spec.keep_adapters
            else None,
        )
        registered = promote(study, ctx)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _log_study_summary(study, tracker, parent)
        tracker.finish(parent, status)
    from sweep.report import study_report

    return study_report(study, registered)


def _champion_run(ctx: StudyContext) -> str | None:
    mv = ctx.tracker.champion(ctx.spec.registered_model_name, CHAMPION)
    return mv.run_id if mv is not None else None


class _AdapterBudget:
    """Keep adapters on disk only for the best ``keep`` trials (and the registered champion's).

    Deleted adapters stay in MLflow as artifacts of their trial's run; only the local copy goes.
    """

    def __init__(self, keep: int, champion_run: str | None = None) -> None:
        self.keep = keep
        self.champion_run = champion_run

    def __call__(self, study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        import shutil

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        with_adapter = [
            t
            for t in study.get_trials(deepcopy=False, states=states)
            if t.user_attrs.get("adapter_path") and Path(t.user_attrs["adapter_path"]).is_dir()
        ]
        sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
        ranked = sorted(with_adapter, key=lambda t: (t.state != optuna.trial.TrialState.COMPLETE, sign * _score(t)))
        for t in ranked[self.keep :]:
            if t.user_attrs.get("mlflow_run_id") == self.champion_run:
                continue
            shutil.rmtree(t.user_attrs["adapter_path"], ignore_errors=True)
            log.info("trial %d: adapter removed from disk (kept in MLflow); keep_adapters=%d", t.number, self.keep)


def _score(t: optuna.trial.FrozenTrial) -> float:
    value = t.value if t.value is not None else t.user_attrs.get("best_value")
    return float("inf") if value is None else float(value)


def _log_study_summary(study: optuna.Study, tracker: Tracker, parent: str) -> None:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "best_step": t.user_attrs.get("best_step"),
                "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                **{f"param.{k}": v for k, v in t.params.items()},
            }
        )
    if rows:
        import pandas as pd

        tracker.client.log_table(parent, pd.DataFrame(rows), "trials.json")
    try:
        best = study.best_trial
    except ValueError:
        return
    tracker.log_metrics(parent, [(f"best/{study.user_attrs['spec']['objective']['metric']}", best.value, best.number)])
    tracker.set_tags(parent, {"best_trial": best.number, "best_run_id": best.user_attrs.get("mlflow_run_id", "")})


def promote(study: optuna.Study, ctx: StudyContext) -> dict[str, Any] | None:
    """Register the best completed trial's adapter and point the ``champion`` alias at it."""
    spec = ctx.spec
    try:
        best = study.best_trial
    except ValueError:
        log.warning("study %s: no completed trial yet; nothing to register", spec.study)
        return None
    adapter = best.user_attrs.get("adapter_path")
    run_id = best.user_attrs.get("mlflow_run_id")
    if not adapter or not Path(adapter).is_dir() or not run_id:
        log.warning("study %s: best trial %d has no adapter on disk; nothing registered", spec.study, best.number)
        return None
    name = spec.registered_model_name
    client = ctx.tracker.client
    version = ctx.tracker.version_of_run(name, run_id)
    if version is None:
        uri = log_chat_model(
            run_id,
            ctx.tracker.uri,
            Path(adapter),
            spec.model.path,
            prompt_template(spec.model.template),
            spec.model.system,
        )
        import mlflow

        mlflow.set_registry_uri(ctx.tracker.uri)
        mine = mlflow.register_model(uri, name, tags={"study": spec.study, "trial": str(best.number)})
        client.set_model_version_tag(name, mine.version, "mlflow_run_id", run_id)
        client.set_model_version_tag(name, mine.version, spec.objective.metric, str(best.value))
        version = ctx.tracker.version_of_run(name, run_id)  # the oldest, if workers registered at once
        if int(version.version) != int(mine.version):
            client.delete_model_version(name, mine.version)
    for attempt in range(4):  # workers finishing together race to move the alias
        try:
            client.set_registered_model_alias(name, CHAMPION, version.version)
            break
        except Exception:  # noqa: BLE001
            if attempt == 3:
                raise
            time.sleep(1 + attempt)
    log.info(
        "study %s: trial %d is %s, registered as %s version %s",
        spec.study,
        best.number,
        CHAMPION,
        name,
        version.version,
    )
    return {"name": name, "version": str(version.version), "alias": CHAMPION}
