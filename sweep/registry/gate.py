"""The test gate: a study's best trial becomes ``champion`` only if it beats the champion on the test split.

Selection (best checkpoint, best trial, Pareto front) only ever sees validation rows. The test split
is looked at once per candidate, here: the candidate's adapter and the current champion's are
scored on it with the same tokens and the same metric, the better one holds the alias, and the
numbers stay on the registered version (tags) and on the study's parent run (metrics), so the
MLflow UI shows why a version is or is not the champion. Workers and studies may gate at the same
time: the alias moves under a lock shared through the registry's store (``sweep.registry.locks``), only
after the champion has been read again there, so a loser that finishes last cannot take it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from objectives import is_better, lookup
from sweep.ranking import best_trial
from sweep.registry.locks import adapter_in_use, champion_lock
from sweep.registry.tracking import Tracker, redact
from sweep.retry import retry_races
from sweep.spec import ObjectiveSpec, Spec
from sweep.xtuner.llava import PROJECTOR as PROJECTOR_DIR
from sweep.xtuner.llava import pads_to_square

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger("sweep")
CHAMPION = "champion"
KEY_TAG = "gate_test_key"  # the scoring_key a version's test/* tags were measured under
MAX_ROUNDS = 8  # the champion changed this often during one gate: give up and say so


def gate_metric(objective: ObjectiveSpec) -> tuple[str, str]:
    """The test metric the gate compares: the test twin of the first objective metric that has one."""
    for name in objective.components:
        m = lookup(name)
        if m.test_name:
            return m.test_name, m.direction
    return "test/loss", "minimize"


@dataclass
class GateResult:
    name: str
    version: str
    moved: bool
    reason: str
    candidate: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] | None = None
    champion_version: str | None = None
    already: bool = False  # the alias pointed to this version before the gate began: nothing recorded
    untrained: dict[str, float] | None = None  # LLaVA: the model before training, on the same test rows

    def as_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "version": self.version, "alias": CHAMPION if self.moved else None}
        out.update(moved=self.moved, reason=self.reason, test=self.candidate)
        if self.champion_version is not None:
            out.update(champion_version=self.champion_version, champion_test=self.champion)
        if self.untrained is not None:
            out.update(untrained_test=self.untrained)
        return out


def promote(
    study: optuna.Study, spec: Spec, tracker: Tracker, data_dir: Path, parent_run_id: str | None
) -> GateResult | None:
    """Register the best trial's adapter; move ``champion`` to it only if it passes the test gate."""
    best = best_trial(study)
    if best is None:
        log.warning("study %s: no completed trial yet; nothing to register", spec.study)
        return None
    return gate_trial(best, spec, tracker, data_dir, parent_run_id)


def gate_trial(
    best: optuna.trial.FrozenTrial, spec: Spec, tracker: Tracker, data_dir: Path, parent_run_id: str | None
) -> GateResult | None:
    """Register one trial's adapter and let it challenge the champion on the test split.

    The adapter is held in use (``adapter_in_use``) from registration to the end, so that no
    worker's ``keep_adapters`` deletes it while it is logged or scored.
    """
    adapter = best.user_attrs.get("adapter_path")
    run_id = best.user_attrs.get("mlflow_run_id")
    if not adapter or not Path(adapter).is_dir() or not run_id:
        log.warning("study %s: best trial %d has no adapter on disk; nothing registered", spec.study, best.number)
        return None
    with adapter_in_use(Path(adapter)):
        if not Path(adapter).is_dir():
            log.warning(
                "study %s: best trial %d's adapter %s was removed by keep_adapters meanwhile; nothing registered",
                spec.study, best.number, adapter,
            )  # fmt: skip
            return None
        return _gate(best, spec, tracker, Path(adapter), run_id, data_dir, parent_run_id)


def _gate(
    best: optuna.trial.FrozenTrial,
    spec: Spec,
    tracker: Tracker,
    adapter: Path,
    run_id: str,
    data_dir: Path,
    parent_run_id: str | None,
) -> GateResult:
    """Register, score and challenge, with the adapter already held in use."""
    name = spec.registered_model_name
    version = str(_register(best, spec, tracker, adapter, run_id).version)
    test_file = data_dir / "test.jsonl"
    if not test_file.is_file() or not test_file.read_text(encoding="utf-8").strip():
        result = GateResult(
            name, version, True, "no test split (data.test); the best trial by validation is the champion"
        )
        with champion_lock(tracker.uri, name):
            _set_alias(tracker, name, version)
    else:
        config = adapter / "xtuner_config.py"

        def score_candidate() -> dict[str, float]:
            log.info("study %s: test gate: scoring trial %d's adapter on %s", spec.study, best.number, test_file)
            return _score(spec, adapter, config, test_file)

        def score_champion(mv: ModelVersion) -> dict[str, float] | None:
            return _score_version(spec, tracker, str(mv.version), config, test_file)

        metric, direction = gate_metric(spec.objective)
        key = scoring_key(spec, test_file, config)
        result = challenge(tracker, name, version, key, metric, direction, score_candidate, score_champion)
        if result.already:
            log.info("study %s: trial %d is already %s (version %s)", spec.study, best.number, CHAMPION, version)
            return result
        if spec.multimodal:  # what training gained: the untrained LLaVA model on the same test rows
            result.untrained = _score_untrained(spec, tracker, name, version, config, test_file)
    _record(result, tracker, run_id, parent_run_id)
    log.info(
        "study %s: trial %d registered as %s version %s; %s %s: %s",
        spec.study, best.number, name, result.version, CHAMPION,
        "moved to it" if result.moved else "kept on version " + str(result.champion_version), result.reason,
    )  # fmt: skip
    return result


def challenge(
    tracker: Tracker,
    name: str,
    version: str,
    key: str,
    metric: str,
    direction: str,
    score_candidate: Callable[[], dict[str, float]],
    score_champion: Callable[[ModelVersion], dict[str, float] | None],
) -> GateResult:
    """The gate after registration: score ``version`` and move ``champion`` to it only if it wins.

    It wins only against the champion current at the moment of the move (``_move_if_better``).
    The candidate's scores go into its tags before any move, so a rival gate that finds it
    champion compares with them instead of scoring it again. Scores already tagged under
    ``key`` (a second ``sweep promote``) are reused.
    """
    current = tracker.champion(name, CHAMPION)
    if current is not None and str(current.version) == version:
        return GateResult(name, version, True, "already the champion", already=True)
    candidate = tagged_scores(tracker.client.get_model_version(name, version), key, metric)
    if candidate is None:
        candidate = score_candidate()
        save_scores(tracker, name, version, candidate, key)
    return _move_if_better(tracker, name, version, candidate, key, metric, direction, current, score_champion)


def _move_if_better(
    tracker: Tracker,
    name: str,
    version: str,
    candidate: dict[str, float],
    key: str,
    metric: str,
    direction: str,
    seen: ModelVersion | None,
    score_champion: Callable[[ModelVersion], dict[str, float] | None],
) -> GateResult:
    """Compare with the champion and move the alias, with the champion read again under ``champion_lock``.

    ``seen`` is the champion read before the candidate was scored. Scoring a champion takes
    minutes, so it happens outside the lock; inside it the champion is read again and the alias
    moves only if it is still the one compared with. If another gate moved it meanwhile, the new
    champion's scores come from its tags (measured under the same ``gate_test_key``) and the
    comparison happens at once; otherwise the lock is let go, the new champion is scored, and
    the step repeats. With a tracking server there is no shared lock (see ``champion_lock``):
    the re-read narrows the race but does not close it.
    """
    champ = seen
    champ_scores = _scores_of(champ, key, metric, score_champion) if champ is not None else None
    for _ in range(MAX_ROUNDS):
        with champion_lock(tracker.uri, name) as kind:
            now = tracker.champion(name, CHAMPION)
            if now is not None and str(now.version) == version:
                return GateResult(name, version, True, "already the champion (moved by another gate)", dict(candidate))
            stale = False
            if _version_of(now) != _version_of(champ):
                champ, champ_scores = now, (tagged_scores(now, key, metric) if now is not None else None)
                stale = now is not None and champ_scores is None  # never scored on this test split
            if not stale:
                return _decide(tracker, name, version, candidate, metric, direction, champ, champ_scores, kind)
            log.info("model %s: %s moved to version %s meanwhile; scoring it", name, CHAMPION, now.version)
        champ_scores = score_champion(champ)  # outside the lock: minutes
    raise RuntimeError(
        f"model {name!r} in {redact(tracker.uri)}: alias {CHAMPION!r} moved {MAX_ROUNDS} times while version "
        f"{version} was being gated; run `sweep promote` again"
    )


def _version_of(mv: ModelVersion | None) -> str | None:
    return None if mv is None else str(mv.version)


def _scores_of(
    mv: ModelVersion, key: str, metric: str, score_champion: Callable[[ModelVersion], dict[str, float] | None]
) -> dict[str, float] | None:
    cached = tagged_scores(mv, key, metric)
    return cached if cached is not None else score_champion(mv)


def _decide(
    tracker: Tracker,
    name: str,
    version: str,
    candidate: dict[str, float],
    metric: str,
    direction: str,
    champ: ModelVersion | None,
    champ_scores: dict[str, float] | None,
    kind: str,
) -> GateResult:
    """The comparison and the move, called under ``champion_lock`` with the champion just re-read."""
    result = GateResult(name, version, True, "", candidate=dict(candidate))
    if champ is None:
        result.reason = f"first champion; {metric} {candidate[metric]:.4f}"
    else:
        result.champion_version = str(champ.version)
        result.champion = champ_scores
        new, old = candidate[metric], (champ_scores or {}).get(metric, float("nan"))
        result.moved = is_better(new, old, direction)
        verb = "beats" if result.moved else "does not beat"
        result.reason = f"{metric} {new:.4f} {verb} version {champ.version}'s {old:.4f} ({direction})"
    if result.moved:
        _set_alias(tracker, name, version)
        log.debug("model %s: %s moved to version %s under %s", name, CHAMPION, version, kind)
    return result


def scoring_key(spec: Spec, test_file: Path, config: Path) -> str:
    """What a test score depends on besides the adapter: scores with the same key are comparable.

    A version's scores are kept in its tags with this key, so a rival gate (same test split,
    same base model and settings) reads them instead of downloading and scoring it again. Both
    sides are tokenized by the candidate's config (``config``): its validation loader (max_length,
    template) is part of the key, since ``max_length`` may be a searched knob.
    """
    from sweep.xtuner.config import load_config

    gen = spec.generation
    loader = load_config(config).val_dataloader.dataset
    settings = {
        "test": hashlib.sha256(test_file.read_bytes()).hexdigest(),
        "tokens": {k: str(v) for k, v in loader.items() if k != "dataset"},
        "model": str(spec.model.path),
        "template": spec.model.template,
        "system": spec.model.system,
        "quantize": spec.model.quantize,
        "rouge": spec.scores_answers,  # the key's name kept: scores tagged before repetition stay comparable
        "max_new_tokens": gen.max_new_tokens if gen else 48,
        "cpu_amp": spec.cpu_amp,
    }
    if spec.multimodal:  # a LLaVA model's scores also depend on its tower and the projector it started from
        settings["llava"] = [str(spec.model.visual_encoder), str(spec.model.projector)]
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_scores(tracker: Tracker, name: str, version: str, scores: dict[str, float], key: str) -> None:
    """Full-precision test scores as version tags (``test/loss`` ...), with the key they were measured under."""
    tracker.set_version_tag(name, version, KEY_TAG, "")  # no reader pairs new scores with an old key
    for metric, value in scores.items():
        tracker.set_version_tag(name, version, metric, repr(float(value)))
    tracker.set_version_tag(name, version, KEY_TAG, key)


def tagged_scores(mv: ModelVersion | None, key: str, metric: str) -> dict[str, float] | None:
    """A version's recorded test scores, if measured under ``key`` and holding ``metric``; None: score it."""
    tags = getattr(mv, "tags", None) or {}
    if tags.get(KEY_TAG) != key:
        return None
    scores: dict[str, float] = {}
    for tag, value in tags.items():
        if tag.startswith("test/"):
            try:
                scores[tag] = float(value)
            except ValueError:
                continue
    return scores if metric in scores else None


def _register(best: optuna.trial.FrozenTrial, spec: Spec, tracker: Tracker, adapter: Path, run_id: str):
    from sweep.registry.serving import log_chat_model, log_llava_model
    from sweep.xtuner.config import prompt_template

    name = spec.registered_model_name
    version = tracker.version_of_run(name, run_id)
    if version is not None:
        return version
    template = prompt_template(spec.model.template)
    if spec.multimodal:  # rows of image + question in (sweep.registry.serving.LlavaChatModel)
        gen = spec.generation
        uri = log_llava_model(
            run_id, tracker, adapter, spec.model.path, spec.model.visual_encoder, template, spec.model.system,
            gen.max_new_tokens if gen else 64, cpu_amp=spec.cpu_amp, needs_remote_code=spec.model.trust_remote_code,
            square=pads_to_square(adapter / "xtuner_config.py"),
        )  # fmt: skip
    else:
        uri = log_chat_model(
            run_id, tracker, adapter, spec.model.path, template, spec.model.system, cpu_amp=spec.cpu_amp,
            needs_remote_code=spec.model.trust_remote_code,
        )  # fmt: skip
    mine = tracker.register(uri, name, tags={"study": spec.study, "trial": str(best.number)})
    tracker.set_version_tag(name, mine.version, "mlflow_run_id", run_id)
    for metric, value in zip(spec.objective.names, best.values, strict=True):
        tracker.set_version_tag(name, mine.version, metric, str(value))
    version = tracker.version_of_run(name, run_id)  # the oldest, if workers registered at once
    if int(version.version) != int(mine.version):
        tracker.client.delete_model_version(name, mine.version)
    return version


def _score(spec: Spec, adapter: Path | None, config: Path, test_file: Path, prefix: str = "test") -> dict[str, float]:
    """The test scores of an adapter (a LLaVA checkpoint folder for a LLaVA spec; None: the untrained LLaVA model)."""
    from sweep.registry.scoring import score_adapter, score_llava
    from sweep.xtuner.config import prompt_template

    gen = spec.generation
    if spec.multimodal:
        return score_llava(adapter, spec, config, test_file, answers=spec.scores_answers,
                           max_new_tokens=gen.max_new_tokens if gen else 48, prefix=prefix)  # fmt: skip
    return score_adapter(
        adapter,
        spec.model.path,
        config,
        test_file,
        template=prompt_template(spec.model.template),
        system=spec.model.system,
        answers=spec.scores_answers,
        max_new_tokens=gen.max_new_tokens if gen else 48,
        quantize=spec.model.quantize,
        cpu_amp=spec.cpu_amp,
        trust_remote_code=spec.model.trust_remote_code,
    )


def _score_version(spec: Spec, tracker: Tracker, version: str, config: Path, test_file: Path):
    """The champion's adapter, from the registry (it may come from another machine or an older run)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = tracker.download(f"models:/{spec.registered_model_name}/{version}", Path(tmp))
        found = sorted(p.parent for p in local.rglob("adapter_config.json"))
        if spec.multimodal:  # the checkpoint folder: the one that holds projector/
            found = sorted(p.parent.parent for p in local.rglob("config.json") if p.parent.name == PROJECTOR_DIR)
        if not found:
            log.warning("version %s has no adapter in the registry; it cannot defend the alias", version)
            return None
        try:
            return _score(spec, found[0], config, test_file)
        except Exception as err:  # noqa: BLE001 - e.g. an adapter of another base model
            log.warning(
                "version %s could not be scored on this base model (%s); it cannot defend the alias", version, err
            )
            return None


UNTRAINED = "untrained_"  # the prefix of the untrained model's test scores (tags, parent-run metrics)


def _score_untrained(spec: Spec, tracker: Tracker, name: str, version: str, config: Path, test_file: Path):
    """The untrained LLaVA model's test scores, as tags ``untrained_test/...`` of the version (``sweep report``
    shows them beside the version's own); None, with a warning, when it cannot be scored."""
    try:
        scores = _score(spec, None, config, test_file)
    except Exception as err:  # noqa: BLE001 - the comparison is information; the gate's decision stands
        log.warning("study %s: the untrained model could not be scored on the test split (%s)", spec.study, err)
        return None
    for metric, value in scores.items():
        tracker.set_version_tag(name, version, UNTRAINED + metric, repr(float(value)))
    return scores


def _record(result: GateResult, tracker: Tracker, run_id: str, parent_run_id: str | None) -> None:
    tags = {"gate": "passed" if result.moved else "kept previous champion", "gate_reason": result.reason}
    for key, value in tags.items():
        tracker.set_version_tag(result.name, result.version, key, value)
    step = int(result.version)
    tracker.log_metrics(run_id, [(k, v, 0) for k, v in result.candidate.items()])
    if parent_run_id:
        rows = [(k, v, step) for k, v in result.candidate.items()]
        rows += [(f"champion_{k}", v, step) for k, v in (result.champion or {}).items()]
        rows += [(UNTRAINED + k, v, step) for k, v in (result.untrained or {}).items()]
        tracker.log_metrics(parent_run_id, rows)
        tracker.set_tags(parent_run_id, {"gate": tags["gate"], "gate_reason": result.reason})


def _set_alias(tracker: Tracker, name: str, version: str) -> None:
    # workers finishing together race to move the alias; any error of that call is retried, as before
    retry_races(lambda: tracker.client.set_registered_model_alias(name, CHAMPION, version), any_error=True)
