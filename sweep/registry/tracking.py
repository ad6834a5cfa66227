"""MLflow: one parent run per study, one nested child run per trial, and the Model Registry.

Everything goes through an explicit ``MlflowClient`` and run ids rather than MLflow's fluent
"active run", because trials run in parallel threads (``--n-jobs``) and each logs to its own run.
The three calls MLflow offers only in its fluent API (logging a pyfunc model, registering it,
downloading by ``models:/`` URI) are made here too, under ``_fluent``.
Runs are found again by tags, so a second ``sweep run`` on the same study continues the same
parent run instead of starting a new one. MLflow is imported by the calls that use it: importing it
takes seconds, and ``sweep run`` starts its training workers before its first MLflow call.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweep.retry import retry_races

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

STUDY_TAG = "xtuner_sweep.study"
ROLE_TAG = "xtuner_sweep.role"
TRIAL_TAG = "xtuner_sweep.trial"
PARENT_TAG = "mlflow.parentRunId"
MAX_BATCH = 900  # MLflow's log_batch takes at most 1000 metrics per call


#: Query parameters that carry a secret: any name holding one of these (libpq's ``password``, ``sslpassword``,
#: tokens and keys of HTTP tracking servers).
SECRET_WORDS = ("password", "passwd", "pwd", "secret", "token", "key")
_FLUENT_LOCK = threading.Lock()  # MLflow's fluent URIs are process-wide: one store at a time


def redact(uri: str) -> str:
    """A storage or tracking URI with its password (and secret query parameters) replaced, to show, log or tag.

    Parsed by SQLAlchemy, as Optuna and MLflow parse it: ``urlsplit`` stops at a ``#``, ``?`` or ``/`` inside a
    password and left ``postgresql://u:pa#ss@host/db`` whole. A URL with more than one ``@`` (an unescaped
    ``@`` in the password), or one that cannot be parsed, loses everything between ``://`` and the last ``@``.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        if uri.count("@") > 1:  # hiding too much beats showing part of a password
            raise ArgumentError("an @ inside the password")
        url = make_url(uri)
    except (ArgumentError, ValueError):
        return re.sub(r"://.*@", "://***@", uri) if "@" in uri else uri
    secret = {k: "***" for k in url.query if any(w in k.lower() for w in SECRET_WORDS)}
    if not (secret or url.password):
        return uri
    return url.update_query_dict(secret).render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


class Tracker:
    """The study's view of an MLflow tracking server or store."""

    def __init__(self, tracking_uri: str) -> None:
        self.uri = tracking_uri
        self.client = retry_races(self._connect, attempts=5)

    def _connect(self) -> MlflowClient:
        """A client whose store exists: the first call creates a new store's tables."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
        return client

    def artifact_root(self, name: str) -> str | None:
        """Artifacts of a SQLite store live beside its database file, not in whatever folder the sweep ran from.

        (MLflow's default is ``./mlruns`` of the current directory: a store moved or opened from
        another folder would lose its adapters.) A tracking server decides for itself: None.
        """
        if not self.uri.startswith("sqlite:///"):
            return None
        db = Path(self.uri.removeprefix("sqlite:///"))
        return (db.resolve().parent / "mlruns" / name).as_uri()

    def experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.artifact_root(name))
        except Exception:  # noqa: BLE001 - another worker created it a moment ago
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def parent_run(self, experiment_id: str, study: str, params: dict[str, Any], spec_text: str) -> str:
        """The study's run: found by tag when the study goes on, created otherwise.

        Workers that start at the same moment may each create one; all then agree on the oldest
        and the others delete their own, so a study has exactly one parent run.
        """
        existing = self._parent_runs(experiment_id, study)
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(experiment_id, run_name=study, tags={STUDY_TAG: study, ROLE_TAG: "study"})
        mine = run.info.run_id
        oldest = self._parent_runs(experiment_id, study)[0].info.run_id
        if oldest != mine:
            self.client.delete_run(mine)
            self.client.update_run(oldest, status="RUNNING")
            return oldest
        self.log_params(mine, params)
        self.client.log_text(mine, spec_text, "spec.yaml")
        return mine

    def _parent_runs(self, experiment_id: str, study: str) -> list:
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{STUDY_TAG}` = '{study}' and tags.`{ROLE_TAG}` = 'study'",
            max_results=50,
        )
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def start_trial(self, experiment_id: str, parent_id: str, study: str, number: int, params: dict) -> str:
        run = self.client.create_run(
            experiment_id,
            run_name=f"trial-{number}",
            tags={PARENT_TAG: parent_id, STUDY_TAG: study, ROLE_TAG: "trial", TRIAL_TAG: str(number)},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(run_id, params=items[i : i + 90])

    def log_metrics(self, run_id: str, rows: Iterable[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, int(step))
            for key, value, step in rows
            if value is not None and math.isfinite(float(value))
        ]
        for i in range(0, len(metrics), MAX_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + MAX_BATCH])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_dict(self, run_id: str, data: dict[str, Any], name: str) -> None:
        """A JSON (or YAML, by ``name``'s suffix) artifact made from ``data``."""
        self.client.log_dict(run_id, data, name)

    def log_answer_table(self, run_id: str, rows: list[dict[str, Any]], table: str, pictures: bool = False) -> None:
        """Append answer rows to a run's MLflow table (``TABLE.json``); with ``pictures``, a row's ``image`` (a file)
        goes in as the picture itself (``mlflow.Image``: the UI shows it beside the question and answer)."""
        columns = {k: [r.get(k) for r in rows] for k in rows[0]}
        if pictures and "image" in columns:
            import mlflow
            from PIL import Image

            columns["image"] = [mlflow.Image(Image.open(p).convert("RGB")) if p else None for p in columns["image"]]
        self.client.log_table(run_id, columns, f"{table}.json")

    def log_artifact(self, run_id: str, path: Path, folder: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), folder)
        elif path.exists():
            self.client.log_artifact(run_id, str(path), folder)

    def finish(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    # -- registry --------------------------------------------------------------------------
    def version_of_run(self, name: str, run_id: str):
        """The oldest registered version made from this run, if any (re-runs must not duplicate it).

        Only "not found" means "none": a registry error must not look like "not registered yet",
        or a re-run would register the run twice.
        """
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException as err:
            if is_not_found(err):
                return None
            raise RegistryError(self._cannot(f"list the versions of model {name!r}", err)) from err
        mine = sorted((mv for mv in versions if mv.run_id == run_id), key=lambda mv: int(mv.version))
        return mine[0] if mine else None

    def champion(self, name: str, alias: str = "champion"):
        """The version ``alias`` points to; None only when the model or the alias does not exist.

        Any other error (the database or server briefly unreachable) propagates: were it read as
        "no champion", the gate would crown its candidate without comparing it with anything.
        MLflow's SQL store says RESOURCE_DOES_NOT_EXIST for a missing model but
        INVALID_PARAMETER_VALUE for a missing alias, so that one is confirmed on the model itself.
        """
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except Exception as err:  # noqa: BLE001 - every failure is named below; only "not found" is None
            if is_not_found(err):
                return None
            if not isinstance(err, MlflowException):
                raise RegistryError(self._cannot(f"read alias {alias!r} of model {name!r}", err)) from err
            try:
                aliases = self.client.get_registered_model(name).aliases or {}
            except MlflowException as again:
                if is_not_found(again):
                    return None
                raise RegistryError(self._cannot(f"read alias {alias!r} of model {name!r}", err)) from again
            if alias not in aliases:
                return None
            raise RegistryError(self._cannot(f"read alias {alias!r} of model {name!r}", err)) from err

    # -- MLflow's fluent-only calls ------------------------------------------------------------------
    @contextmanager
    def _fluent(self) -> Iterator[None]:
        """This store as MLflow's process-wide tracking and registry URI for one call, then the previous ones."""
        import mlflow

        with _FLUENT_LOCK:
            before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_registry_uri(self.uri)
            try:
                yield
            finally:
                mlflow.set_tracking_uri(before[0])
                mlflow.set_registry_uri(before[1])

    def warm_model_logging(self) -> threading.Thread | None:
        """Start, in a daemon thread, the scan MLflow's first ``log_model`` of this process makes: it checks the
        model's pip requirements against every installed distribution (``importlib.metadata``), seconds on a full
        environment. Started while trials train, it is no longer in the sweep's tail before the champion is logged.
        A no-op (None) on an MLflow without that step; a failure only leaves the scan to ``log_model``."""
        try:
            from mlflow.utils import requirements_utils
        except ImportError:
            return None
        scan = getattr(requirements_utils, "_init_modules_to_packages_map", None)
        if scan is None:
            return None

        def run() -> None:
            with contextlib.suppress(Exception):  # log_model scans again itself
                scan()

        thread = threading.Thread(target=run, name="mlflow-requirements-scan", daemon=True)
        thread.start()
        return thread

    def log_pyfunc(self, run_id: str, **log_model_args: Any) -> str:
        """``mlflow.pyfunc.log_model`` into an existing run; returns the model URI to register."""
        import mlflow

        with self._fluent(), mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(**log_model_args).model_uri

    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        """A registered version's tag, written again if another process wrote the same tag at the same moment: the
        store inserts a tag it has not seen, and PostgreSQL refuses the second of two such inserts
        (``model_version_tag_pk``), as when two workers of one study gate the same version at once."""
        retry_races(lambda: self.client.set_model_version_tag(name, version, key, value))

    def register(self, model_uri: str, name: str, tags: dict[str, str]):
        """A new version of ``name`` from a logged model (the registered model is made when it is new)."""
        import mlflow

        with self._fluent():
            return mlflow.register_model(model_uri, name, tags=tags)

    def download(self, uri: str, dst: Path) -> Path:
        """Artifacts by URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...``) into ``dst``."""
        import mlflow

        with self._fluent():
            return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))

    def _cannot(self, what: str, err: Exception) -> str:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"registry {redact(self.uri)}: cannot {what}: {getattr(err, 'error_code', type(err).__name__)}: {first}"


class RegistryError(RuntimeError):
    """The registry failed to answer (as opposed to answering "not found")."""


def is_not_found(err: Exception) -> bool:
    """MLflow's "no such resource" (a model, version or run), as opposed to any failure to answer."""
    return getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"
