"""The sweep spec: one YAML file that says what to train, on which data, and what to search.

Everything a study needs is read and checked here, before anything is created on disk, in
Optuna or in MLflow, so that a typo costs a second instead of an hour of GPU time. Errors
name the file and the dotted path of the offending key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from objectives import GROUP_NAME, METRICS, WEIGHTED, lookup
from objectives.selection import DEFAULT_KEEP, KEEP_RULES
from sweep.errors import SpecError
from sweep.knobs import KNOBS, check_knob

#: A study name becomes a folder and an MLflow experiment: letters, digits, `_`, `.`, `-`, and not only dots.
STUDY_NAME = r"^(?!\.+$)[A-Za-z0-9_.\-]+$"
#: A registered model name goes into MLflow filter strings and URIs (``models:/NAME@champion``).
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntParam(_Strict):
    type: Literal["int"]
    low: int
    high: int
    step: int = 1
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        _check_range(self.low, self.high, self.log)
        return self


class FloatParam(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        _check_range(self.low, self.high, self.log)
        return self


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[int | float | str | bool] = Field(min_length=1)


Param = Annotated[IntParam | FloatParam | CategoricalParam, Field(discriminator="type")]


def _check_range(low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"low ({low}) is greater than high ({high})")
    if log and low <= 0:
        raise ValueError(f"a log range must be above 0, got low={low}")
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("low and high must be finite numbers")


class ModelSpec(_Strict):
    path: Path
    template: str = "qwen_chat"
    quantize: bool = False
    system: str = ""
    # Run the Python code a model folder ships (InternLM2 needs it; Qwen2 and Llama do not). Off unless the
    # spec says so, whatever the base config says: the code runs with the sweep's rights.
    trust_remote_code: bool = False
    # LLaVA (a multimodal base config): the vision tower's Hugging Face folder (CLIP, with its image processor) and
    # the projector pretrained in stage 1 (XTuner's `pretrained_pth`, an iter_N.pth); `path` is then the LLM's folder.
    visual_encoder: Path | None = None
    projector: Path | None = None


class DataSpec(_Strict):
    """Where the rows are. ``val`` and ``test`` are a fraction of ``task``, a file, or one file per group of rows
    (``{identity: a.jsonl, new: b.jsonl}``: each file's rows get that ``group``, see ``sweep.groups``)."""

    task: Path
    general: Path | None = None
    val: float | Path | dict[str, Path] = 0.1
    test: float | Path | dict[str, Path] | None = None
    general_val: float = 0.1
    seed: int = 0
    # Rows whose questions are the same or nearly (after normalising) but whose answers differ, and held-out
    # questions also trained on (sweep.conflicts): warn and train anyway, or refuse the data before anything runs.
    conflicts: Literal["warn", "error"] = "warn"
    # LLaVA data (``sweep.llava_data``): the image folder of task/val/test rows, and of the general rows when they
    # have images elsewhere (default: ``images``). Rows are then LLaVA JSON rows (``conversation(s)``, ``image``).
    images: Path | None = None
    general_images: Path | None = None

    @field_validator("val", "test")
    @classmethod
    def _fraction(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError(f"a fraction must be between 0 and 1 (exclusive), got {v}")
        if isinstance(v, dict):
            if not v:
                raise ValueError("name at least one group and its file")
            for group in v:
                if not re.fullmatch(GROUP_NAME, group):
                    raise ValueError(f"{group!r} is not a group name: letters, digits, '_', '.' or '-'")
        return v

    @field_validator("general_val")
    @classmethod
    def _general_fraction(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"general_val must be in [0, 1), got {v}")
        return v


class ObjectiveSpec(_Strict):
    """One metric, a weighted sum of metrics, or several metrics at once (a Pareto front).

    ``metric: val/rouge_l`` optimizes one metric in its own direction; ``weights: {val/loss: 1,
    val/general_loss: 0.5}`` optimizes their weighted sum (``val/weighted``, minimized unless
    ``direction`` says otherwise); ``metrics: [val/loss, val/general_loss]`` makes a multi-objective
    study, each metric in its own direction. The first named metric is the primary one: it picks
    a trial's kept checkpoint and, among the Pareto trials, the champion.

    ``keep`` is the rule that picks a trial's checkpoint on the primary metric, and so its value
    (``objectives.selection``): ``best``, ``better_beyond_noise`` or ``latest_within_noise``.
    """

    metric: str | None = None
    metrics: list[str] | None = None
    weights: dict[str, float] | None = None
    direction: Literal["minimize", "maximize"] | None = None
    # Constraints: a trial whose value at its best point is above a limit is infeasible (an Optuna constraint: the
    # sampler steers away, and it never becomes champion), e.g. {val/repetition: 0.2, val/no_stop: 0.5}.
    at_most: dict[str, float] | None = None
    # Which validation point a trial keeps (its adapter and its value), given each point's standard error.
    keep: str = DEFAULT_KEEP

    @field_validator("keep")
    @classmethod
    def _keep_rule(cls, v: str) -> str:
        if v not in KEEP_RULES:
            raise ValueError(f"expected one of {', '.join(KEEP_RULES)}, got {v!r}")
        return v

    @field_validator("metric", "metrics", "weights", "at_most")
    @classmethod
    def _known(cls, v: Any) -> Any:
        for name in [v] if isinstance(v, str) else list(v or []):
            if lookup(name) is None:
                grouped = sorted(n for n, m in METRICS.items() if m.per_group)
                raise ValueError(
                    f"{name!r} is produced by nothing; known: {sorted(METRICS)}, and per group of rows "
                    f"METRIC/GROUP for {grouped}"
                )
        return v

    @field_validator("at_most")
    @classmethod
    def _limits(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for name, limit in (v or {}).items():
            if lookup(name).direction != "minimize":
                raise ValueError(f"{name}: is to maximize; at_most limits a metric to minimize from above")
            if not math.isfinite(limit):
                raise ValueError(f"{name}: the limit must be a finite number, got {limit}")
        return v

    @model_validator(mode="after")
    def _one_shape(self) -> ObjectiveSpec:
        given = [k for k in ("metric", "metrics", "weights") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of metric, metrics or weights, not {' and '.join(given)}")
        if self.metrics is not None:
            if len(self.metrics) < 2 or len(set(self.metrics)) != len(self.metrics):
                raise ValueError("metrics: a multi-objective study needs 2 or more different metrics")
            if self.direction is not None:
                raise ValueError("direction: with `metrics`, each metric keeps its own direction")
        if self.weights is not None and not self.weights:
            raise ValueError("weights: name at least one metric")
        if self.metric is not None and self.direction and self.direction != lookup(self.metric).direction:
            raise ValueError(f"direction: {self.metric} is to {lookup(self.metric).direction}, not {self.direction}")
        return self

    @property
    def components(self) -> list[str]:
        """The metrics a trial must produce."""
        if self.metrics is not None:
            return list(self.metrics)
        if self.weights is not None:
            return list(self.weights)
        return [self.metric or "val/loss"]

    @property
    def measured(self) -> list[str]:
        """Every metric the objective reads: its components and its constraints."""
        return self.components + [n for n in self.at_most or {} if n not in self.components]

    @property
    def names(self) -> list[str]:
        """What Optuna optimizes, in order."""
        return [WEIGHTED] if self.weights is not None else self.components

    @property
    def directions(self) -> list[str]:
        if self.weights is not None:
            return [self.direction or "minimize"]
        return [lookup(n).direction for n in self.names]

    @property
    def primary(self) -> str:
        return self.names[0]

    @property
    def primary_direction(self) -> str:
        return self.directions[0]

    @property
    def multi(self) -> bool:
        return len(self.names) > 1

    def describe(self) -> str:
        if self.weights is not None:
            terms = " + ".join(f"{w:g}*{n}" for n, w in self.weights.items())
            text = f"{self.primary_direction} {WEIGHTED} = {terms}"
        else:
            text = ", ".join(f"{d} {n}" for n, d in zip(self.names, self.directions, strict=True))
        limits = ", ".join(f"{n} <= {v:g}" for n, v in (self.at_most or {}).items())
        return f"{text}; feasible if {limits}" if limits else text


class SamplerSpec(_Strict):
    type: Literal["tpe", "random", "grid", "cmaes", "nsga2"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int | None = None


class PrunerSpec(_Strict):
    type: Literal["median", "percentile", "hyperband", "successive_halving", "none"] = "median"
    n_startup_trials: int = 2
    n_warmup_steps: int = 0
    percentile: float = 50.0


class GenerationSpec(_Strict):
    """Greedy answers during validation: for ``val/rouge_l`` and the probe questions' sample table."""

    max_new_tokens: int = Field(default=48, ge=1)
    max_rows: int = Field(default=32, ge=1)  # the first N validation rows, the same in every trial


class ImageProbe(_Strict):
    """A probe question about a picture (LLaVA): ``{image: img/06.jpg, question: "What is in it?"}``."""

    image: Path
    question: str = Field(min_length=1)


class SpeedSpec(_Strict):
    """Settings that change how fast a trial trains, never what it computes (see docs/benchmarks.md)."""

    activation_checkpointing: Literal["auto", "on", "off"] = "auto"  # auto: off when the trial fits on a GPU without
    tokenize_once: bool = True  # tokenize the study's rows once; trials only mix and pack them
    resident_workers: bool = True  # train trial after trial in long-lived processes that keep the model loaded
    # resident workers forked from one process that imported the training stack once (sweep.trial.forked), not
    # each importing it; where that process finds CUDA initialized after its imports, workers start on their own
    # and the sweep's log says where it was initialized. auto and on: forked, on the CPU and GPUs alike (auto was
    # CPU-only until a GPU run proved the forks, docs/benchmarks.md; both words stay valid); off: each on its own
    fork_workers: Literal["auto", "on", "off"] = "auto"
    # a resident worker trains up to this many of a GPU's trials at once over one copy of the base model, their
    # steps joined into one pass (sweep.training.cotrain); 1: one trial per process
    trials_per_worker: int = Field(default=1, ge=1, le=16)
    frozen_weights_16bit: bool = True  # frozen weights under LoRA stay in their 16-bit load dtype, not fp32
    baseline_once: bool = True  # the untrained step-0 validation point, measured once per study and shared
    # the last projection and the loss computed together, never the whole logits tensor (sweep.training.fused_loss)
    # auto: cut-cross-entropy (or Liger) on a GPU where installed, else off (sweep.speed)
    fused_loss: Literal["auto", "off", "chunked", "cce", "liger"] = "auto"
    compile: bool = False  # each decoder layer under torch.compile (sweep.training.compiled)
    # Liger-Kernel's fused RMSNorm and SiLU-times-up kernels in eager decoder layers (sweep.training.kernels); auto:
    # on a GPU where liger-kernel is installed, else off
    fused_kernels: Literal["auto", "on", "off"] = "auto"
    # LoRA layers take a 16-bit input as it is, not cast to the adapter's fp32 (PEFT's cast_input_dtype_enabled);
    # auto: on CUDA (other dropout masks of the same distribution; the CPU's dropout would round 1/(1-p) to bf16)
    lora_input_16bit: Literal["auto", "on", "off"] = "auto"
    # compiled layers' LoRA dropout masks: "eager" draws them as an eager step does (the same masks, an eager
    # kernel beside the compiled graph), "fused" inside the compiled kernel (other masks, same distribution)
    compile_dropout: Literal["eager", "fused"] = "fused"
    compile_exact_casts: bool = True  # compiled layers round intermediates to 16 bits where eager does
    # processes that collate the training batches beside the training process (the DataLoader's num_workers);
    # 0 by default: on an H200 two of them cut the wait for a batch but not the step (docs/benchmarks.md)
    data_workers: int = Field(default=0, ge=0, le=16)
    # the optimizer's fused kernel (torch's fused=True); off by default: no gain measured on an H200 (benchmarks.md)
    fused_optimizer: Literal["auto", "on", "off"] = "off"
    # trials that share a GPU as clients of a CUDA MPS server of the sweep's own, their kernels side by side instead
    # of in turns (sweep.trial.mps); auto: where trials share a GPU and a server can start, on: an error where not
    mps: Literal["auto", "on", "off"] = "auto"

    @model_validator(mode="after")
    def _joined_steps_run_uncompiled(self) -> SpeedSpec:
        if self.trials_per_worker > 1 and self.compile:
            raise ValueError("speed.trials_per_worker > 1 joins trials' steps into one uncompiled pass; it cannot be "
                             "used with speed.compile: true (choose one)")  # fmt: skip
        return self

    @field_validator(
        "activation_checkpointing",
        "fused_loss",
        "fused_kernels",
        "lora_input_16bit",
        "fused_optimizer",
        "mps",
        "fork_workers",
        mode="before",
    )
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        """YAML 1.1 reads a bare ``on``/``off`` as a boolean: take it as the word the user wrote."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class RegistrySpec(_Strict):
    name: str

    @field_validator("name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if not re.fullmatch(MODEL_NAME, v):
            raise ValueError(
                f"{v!r} is not a model name: letters, digits, '_', '.', '-', starting with a letter or digit"
            )
        return v


class Spec(_Strict):
    """A whole sweep. Paths are resolved relative to the spec file's folder."""

    study: str
    base_config: str
    model: ModelSpec
    data: DataSpec
    search_space: dict[str, Param] = Field(default_factory=dict)
    fixed: dict[str, int | float] = Field(default_factory=dict)
    objective: ObjectiveSpec = ObjectiveSpec()
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    n_trials: int = Field(default=10, ge=1)
    timeout: float | None = Field(default=None, gt=0)
    eval_every: int = Field(default=64, ge=1)
    keep_checkpoints: int = Field(default=1, ge=0)
    keep_adapters: int | None = Field(default=None, ge=1)
    registry: RegistrySpec | None = None
    seed: int = 0
    generation: GenerationSpec | None = None
    probes: list[str | ImageProbe] = Field(default_factory=list)
    gpus_per_trial: int = Field(default=1, ge=1)  # >1: torchrun + DeepSpeed ZeRO-2 on that many whole GPUs
    # Without a GPU: false trains in fp32; true loads the model in bf16 and trains under bf16 autocast, the
    # dtypes a GPU trains in (how CI sees them). Scoring and the champion then run in bf16 too.
    cpu_amp: bool = False
    speed: SpeedSpec = SpeedSpec()

    @property
    def multimodal(self) -> bool:
        """A LLaVA sweep: the spec names a visual encoder (``sweep.llava_data``, ``sweep.xtuner.llava``)."""
        return self.model.visual_encoder is not None

    @property
    def generates(self) -> bool:
        return self.generation is not None or bool(self.probes) or self.scores_answers

    @property
    def scores_answers(self) -> bool:
        """Whether validation rows are answered: val/rouge_l, val/repetition and val/no_stop (and their test twins)."""
        return self.generation is not None or any(lookup(n).answers for n in self.objective.measured)

    @field_validator("study")
    @classmethod
    def _study_name(cls, v: str) -> str:
        if not re.fullmatch(STUDY_NAME, v):
            raise ValueError(f"{v!r} is not a study name: letters, digits, '_', '.', '-', and not only dots")
        return v

    @field_validator("search_space", "fixed")
    @classmethod
    def _known_knobs(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if name not in KNOBS:
                raise ValueError(f"unknown knob {name!r}; expected one of {sorted(KNOBS)}")
        return v

    @model_validator(mode="after")
    def _modality(self) -> Spec:
        """LLaVA keys come together: a visual encoder needs an image folder, and image probes need both."""
        if self.multimodal and self.data.images is None:
            raise ValueError("data.images: a LLaVA spec (model.visual_encoder) needs the image folder of its rows")
        if not self.multimodal:
            for key in ("images", "general_images"):
                if getattr(self.data, key) is not None:
                    raise ValueError(f"data.{key}: image folders need a LLaVA spec; set model.visual_encoder")
            if self.model.projector is not None:
                raise ValueError("model.projector: a pretrained projector needs model.visual_encoder (LLaVA)")
        kinds = {type(p) for p in self.probes}
        if self.multimodal and str in kinds:
            raise ValueError("probes: a LLaVA spec asks about pictures: give each probe as {image: FILE, question: Q}")
        if not self.multimodal and ImageProbe in kinds:
            raise ValueError("probes: a probe with an image needs a LLaVA spec (model.visual_encoder)")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        both = set(self.search_space) & set(self.fixed)
        if both:
            raise ValueError(f"{sorted(both)} are both searched and fixed; keep one")
        alpha = {"lora_alpha", "lora_alpha_ratio"} & (set(self.search_space) | set(self.fixed))
        if len(alpha) == 2:
            raise ValueError("give lora_alpha or lora_alpha_ratio, not both")
        for name, param in self.search_space.items():
            want = KNOBS[name]
            if isinstance(param, IntParam) and want is not int:
                raise ValueError(f"search_space.{name}: is a float knob; use type: float")
            if isinstance(param, CategoricalParam):
                for choice in param.choices:
                    if want is int and (isinstance(choice, bool) or not isinstance(choice, int)):
                        raise ValueError(f"search_space.{name}: choice {choice!r} is not an int")
                    if want is float and not isinstance(choice, (int, float)):
                        raise ValueError(f"search_space.{name}: choice {choice!r} is not a number")
            if isinstance(param, FloatParam) and want is int:
                raise ValueError(f"search_space.{name}: is an int knob; use type: int")
            for value in param.choices if isinstance(param, CategoricalParam) else (param.low, param.high):
                try:
                    check_knob(name, value)
                except ValueError as err:
                    raise ValueError(f"search_space.{err}") from None
        for name, value in self.fixed.items():
            try:
                check_knob(name, value)
            except ValueError as err:
                raise ValueError(f"fixed.{err}") from None
        return self

    def with_study(self, name: str) -> Spec:
        """This spec under another study name (``--study``), validated like the file's own."""
        try:
            return Spec.model_validate({**self.model_dump(), "study": name})
        except ValidationError as err:
            raise SpecError(
                f"--study {name!r}: {_format_errors(Path('--study'), err).splitlines()[-1].strip()}"
            ) from None

    @property
    def registered_model_name(self) -> str:
        return self.registry.name if self.registry else f"{self.study}-adapter"


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; relative paths in it become absolute (from the file's folder)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    raw.setdefault("study", path.stem.replace(" ", "_"))
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_errors(path, err)) from None
    return _resolve_paths(spec, path.resolve().parent)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML lets the last one win silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: SafeLoader merges it below
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not {type(key).__name__}", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where (line and column) and what, instead of PyYAML's five-line report."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    if "\\t" in problem:  # PyYAML writes the tab it found as '\t'
        problem += " (YAML indents with spaces, not tabs)"
    return f"not valid YAML: {where}{problem}"


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} problem(s) in the spec"]
    for e in err.errors():
        # Drop pydantic's union branch names ("float", "path", "IntParam") from the key path.
        loc = ".".join(str(p) for p in e["loc"] if not _is_branch_label(p)) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _is_branch_label(part: Any) -> bool:
    """Pydantic names the branch of a union it tried ("float", "function-after[...]"): not a key of the file."""
    return isinstance(part, str) and (part in UNION_BRANCHES or "[" in part or part.startswith("function-"))


UNION_BRANCHES = {"int", "float", "categorical", "str", "bool", "path", "IntParam", "FloatParam", "CategoricalParam",
                  "ImageProbe"}  # fmt: skip


def _resolve_paths(spec: Spec, base: Path) -> Spec:
    def absolute(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p).resolve())

    data = spec.data.model_copy(
        update={
            "task": absolute(spec.data.task),
            "general": absolute(spec.data.general),
            "val": _absolute_split(spec.data.val, absolute),
            "test": _absolute_split(spec.data.test, absolute),
            "images": absolute(spec.data.images),
            "general_images": absolute(spec.data.general_images),
        }
    )
    model = spec.model.model_copy(
        update={
            "path": absolute(spec.model.path),
            "visual_encoder": absolute(spec.model.visual_encoder),
            "projector": absolute(spec.model.projector),
        }
    )
    probes = [p.model_copy(update={"image": absolute(p.image)}) if isinstance(p, ImageProbe) else p
              for p in spec.probes]  # fmt: skip
    base_config = spec.base_config
    if base_config.endswith(".py") and not Path(base_config).is_absolute():
        base_config = str((base / base_config).resolve())
    return spec.model_copy(update={"data": data, "model": model, "base_config": base_config, "probes": probes})


def _absolute_split(split: Any, absolute: Any) -> Any:
    """A held-out split's file (or files, by group) made absolute; a fraction as it is."""
    if isinstance(split, Path):
        return absolute(split)
    if isinstance(split, dict):
        return {group: absolute(path) for group, path in split.items()}
    return split


def spec_summary(spec: Spec) -> dict[str, Any]:
    """The spec as plain JSON-able data, for the MLflow parent run and Optuna's study attributes."""
    return spec.model_dump(mode="json")


def stored_spec(study: Any) -> Spec:
    """The spec an Optuna study was run with (its ``spec`` attribute), or a SpecError saying why it cannot be used."""
    saved = study.user_attrs.get("spec")
    if not saved:
        raise SpecError(f"study {study.study_name}: has no spec attribute; it was not made by `sweep run`")
    try:
        return Spec.model_validate(saved)
    except ValidationError as err:
        raise SpecError(_format_errors(Path(f"study {study.study_name}'s stored spec"), err)) from None
