"""The contract between a trial (the sweep's process) and its training process: the one schema both import.

They share no memory, only a trial's work dir and a few environment variables:

- the rendered config names the training side's classes by dotted path (``HOOK_TYPE``, ...) and hands the
  hook its ``HookSettings``;
- the hook appends one JSON line per event to ``TrialFiles.stream`` (``Start``, ``Train``, ``Val``,
  ``Samples``, ``ValAnswers``, ``TrainingWarning``, ``End``); the trial reads them with ``EventReader`` while
  training runs;
- after each validation point the hook waits for the trial's ``Verdict`` in ``TrialFiles.control``;
- a resident worker takes a ``Job`` as one line on its stdin and writes a ``Done`` file when it ends.

Every file one side reads while the other writes it is written whole (``sweep.atomic``) or appended line by
line, so a reader never acts on half of it. Field names are the stream's wire format: benchmarks and users'
scripts read ``sweep_metrics.jsonl`` directly, so a rename here is a format change.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from sweep import atomic

#: Set to "1" in a training process the sweep watches: the hook then waits for a verdict after each point.
CONTROL_ENV = "XTUNER_SWEEP_CONTROL"
#: Set to "1" to have the hook also save the adapter of every validation point in ``POINT_ADAPTERS_DIR``
#: (``benchmarks/fit_rule.py`` scores them on the test split to compare keep rules; sweeps never need it).
SAVE_POINTS_ENV = "XTUNER_SWEEP_SAVE_POINTS"
#: A resident worker trains up to this many jobs at once over one shared base model (``sweep.training.cotrain``).
JOBS_AT_ONCE_ENV = "XTUNER_SWEEP_JOBS_AT_ONCE"
# set (to anything but "" or "0") for `sweep run`: each training job profiles its set-up, from the job's start to the
# end of the hooks' before_train, and writes the largest entries to SETUP_PROFILE in its work dir (all of it beside,
# as .prof for pstats); not with speed.trials_per_worker > 1
PROFILE_SETUP_ENV = "XTUNER_SWEEP_PROFILE_SETUP"
SETUP_PROFILE = "setup_profile.txt"
#: How long the hook waits for a verdict before it trains on (and says so in the stream).
VERDICT_TIMEOUT_S = 900.0

#: The training side, as the rendered config and the launcher name it.
WORKER_MODULE = "sweep.training.worker"
HOOK_TYPE = "sweep.training.hook.SweepHook"
VAL_METRIC_TYPE = "sweep.training.metrics.ValLossMetric"
CPU_AMP_WRAPPER_TYPE = "sweep.training.amp.CpuAmpOptimWrapper"
MEMORY_HOOK_TYPE = "sweep.training.memory.StepMemoryHook"

#: A training iteration's metric: the allocator's reserve so far (``torch.cuda.max_memory_reserved``), in MB; the peak
#: the sweep plans trials by, sent with every iteration so that a trial's slot fits it after its first iterations.
RESERVED_KEY = "perf/reserved_mb"
#: A trial of packed rows (every step the same shape) has reached its peak this many iterations after its first optimizer
#: step (which creates the optimizer's states), and its GPU slot is then fitted to the reserve it reports.
PEAK_AFTER_ITERS = 2

#: ``speed.fused_loss``'s logits exist for at most this many positions at once (what the memory plan counts on).
FUSED_LOSS_CHUNK = 2048
#: Model config keys that rescale or cap the logits (Gemma, Cohere, Granite, MiniCPM): no fused loss for them.
LOGIT_SCALING_KEYS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier_scale",
    "logits_scaling",
    "dim_model_base",
    "scale_width",
)

STREAM_FILE = "sweep_metrics.jsonl"
CONTROL_FILE = "sweep_control.json"
ADAPTER_DIR = "best_adapter"  # the kept point's adapter (``objective.keep``), "best" by that rule
POINT_ADAPTERS_DIR = "point_adapters"  # step_NNNNNN/ per validation point, with SAVE_POINTS_ENV only
DONE_FILE = "worker.json"
BASELINE_DIR = "baseline"  # beside the trial folders: the study's shared step-0 points


@dataclass(frozen=True)
class TrialFiles:
    """Where one trial's inputs are and where both processes put what they exchange; all absolute."""

    train: Path
    val: Path
    work_dir: Path
    n_train_rows: int
    general_val: Path | None = None  # held-out general chat rows, for val/general_loss
    tokenized: bool = False  # ``train`` holds input_ids/labels already (sweep.xtuner.tokenized)
    data_digest: str = ""  # the study's data split (sweep.data): what the validation files hold
    groups: tuple[str, ...] = ()  # the groups the validation rows carry (sweep.groups); () for none

    @property
    def stream(self) -> Path:
        return self.work_dir / STREAM_FILE

    @property
    def control(self) -> Path:
        return self.work_dir / CONTROL_FILE

    @property
    def adapter(self) -> Path:
        return self.work_dir / ADAPTER_DIR

    @property
    def done(self) -> Path:
        return self.work_dir / DONE_FILE

    def baseline(self, key: str) -> Path:
        return self.work_dir.parent / BASELINE_DIR / f"{key}.json"


def point_adapter(work_dir: Path, step: int) -> Path:
    """Where the hook saves a validation point's adapter when ``SAVE_POINTS_ENV`` asks it to."""
    return work_dir / POINT_ADAPTERS_DIR / f"step_{step:06d}"


@dataclass
class HookSettings:
    """The hook's arguments, as ``sweep.xtuner.render`` writes them into the config (literal values only)."""

    metric: str
    rule: str  # "less" or "greater": which way the metric improves
    eval_every: int  # validate each time this many training rows were seen
    n_train_rows: int
    stream: str
    control: str
    adapter_dir: str
    generation: dict[str, Any] | None = None  # greedy answers: val/rouge_l and probe answers
    general_val: dict[str, Any] | None = None  # a second validation loader, for val/general_loss
    weights: dict[str, float] | None = None  # the weighted objective's components
    frozen_16bit: bool = False
    baseline: str | None = None  # the study's cached step-0 point for this key, or None
    fused_loss: str = "off"  # speed.fused_loss
    compile: bool = False  # speed.compile
    compile_dropout: str = "fused"  # speed.compile_dropout
    compile_exact_casts: bool = True  # speed.compile_exact_casts
    fused_kernels: bool = False  # speed.fused_kernels as this trial runs it
    lora_input_16bit: bool = False  # speed.lora_input_16bit
    groups: list[str] | None = None  # the validation rows' groups: metrics per group too (sweep.groups)
    keep: str = "best"  # objective.keep: which point's adapter is kept (objectives.selection)

    def as_config(self) -> dict[str, Any]:
        return {"type": HOOK_TYPE, **asdict(self)}


# -- events: one JSON object per line, ``kind`` first ------------------------------------------------


@dataclass
class Event:
    kind: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Event:
        """Unknown keys are ignored and missing ones read as None: a stream from another version still reads."""
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        return cls(**{**dict.fromkeys(required), **{k: raw[k] for k in raw if k in {f.name for f in fields(cls)}}})


@dataclass
class Start(Event):
    """Training began: the schedule the trial's progress and pruning are planned with."""

    kind: ClassVar[str] = "start"
    max_iters: int
    iters_per_epoch: int
    final_step: int  # the x-axis value (training rows seen) of the last iteration
    world_size: int = 1
    frozen_weights_16bit: int = 0  # elements of frozen weights put back in 16 bits
    fused_loss: str = "off"  # the loss implementation training uses
    compiled: bool = False  # decoder layers run compiled in training steps (compiling is in the first steps' time)
    fused_kernels: int = 0  # norms and MLPs switched to Liger's kernels (speed.fused_kernels; they run on CUDA only)
    lora_input_16bit: int = 0  # LoRA layers that take a 16-bit input as it comes (speed.lora_input_16bit)
    # when (wall clock) the training process began this job and mmengine's runner was built (its before_run): the
    # set-up before ``time`` split into the job's hand-over, the runner (config, model, LoRA, data loaders,
    # optimizer) and the rest (weight init, resume, the hooks' before_train)
    job_began: float | None = None
    runner_built: float | None = None
    joined_steps: bool = False  # its steps are joined with other trials' over one shared base model (cotrain)
    time: float = field(default_factory=time.time)


@dataclass
class Train(Event):
    """One training iteration; ``metrics`` are the ``train/`` and ``perf/`` curves."""

    kind: ClassVar[str] = "train"
    iter: int
    step: int
    metrics: dict[str, float | None]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "iter": self.iter, "step": self.step, **self.metrics}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Train:
        return cls(raw.get("iter"), raw.get("step"), {k: v for k, v in raw.items() if "/" in k})


@dataclass
class Val(Event):
    """One validation point: every ``val/`` metric at ``step`` (with its standard error, ``val/loss_se``), and the
    step of the point kept so far (``best_step``: the best by ``objective.keep``'s rule, whose adapter is saved)."""

    kind: ClassVar[str] = "val"
    step: int
    iter: int
    metrics: dict[str, float]
    best_step: int | None
    cached: bool = False  # the study's shared step-0 point, read instead of measured
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        cached = {"baseline": "cached"} if self.cached else {}
        return {"kind": self.kind, "step": self.step, "iter": self.iter, **self.metrics,
                "best_step": self.best_step, **cached, "time": self.time}  # fmt: skip

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Val:
        metrics = {k: v for k, v in raw.items() if "/" in k and isinstance(v, (int, float))}
        return cls(raw.get("step"), raw.get("iter", 0), metrics, raw.get("best_step"), raw.get("baseline") == "cached",
                   raw.get("time", 0.0))  # fmt: skip


@dataclass
class AnswerRows(Event):
    """Greedy answers at a validation point, as rows of one of the trial's MLflow answer tables (``table``.json)."""

    table: ClassVar[str] = ""
    step: int
    rows: list[dict[str, Any]]


@dataclass
class Samples(AnswerRows):
    """The probes' answers (rows of step, question, answer, and the runaway flags repeats, no_stop)."""

    kind: ClassVar[str] = "samples"
    table: ClassVar[str] = "samples"


@dataclass
class ValAnswers(AnswerRows):
    """The answers to the validation rows that ``val/rouge_l``, ``val/repetition`` and ``val/no_stop`` are taken
    from (rows of step, group, question, reference, answer, rouge_l, repeats, no_stop)."""

    kind: ClassVar[str] = "val_answers"
    table: ClassVar[str] = "val_answers"


@dataclass
class TrainingWarning(Event):
    kind: ClassVar[str] = "warning"
    message: str


@dataclass
class End(Event):
    """Training ended (by its schedule or a prune verdict)."""

    kind: ClassVar[str] = "end"
    iter: int
    step: int
    best_step: int | None  # the kept point (objective.keep)
    best_value: float | None
    stopped_early: bool
    val_seconds: float
    peak_memory_mb: float | None  # the allocator's reserve: what the GPU slots plan with
    adapter: str | None
    time: float = field(default_factory=time.time)
    # where its joined steps went (cotrain.PassStats.summary): passes, trials and rows a pass, seconds a pass took to
    # return and a step waited for its pass to begin; None when it trained alone
    joined: dict[str, float] | None = None


EVENTS: dict[str, type[Event]] = {
    cls.kind: cls for cls in (Start, Train, Val, Samples, ValAnswers, TrainingWarning, End)
}
#: The answer tables by name, as ``sweep.training.answers`` makes them.
ANSWER_TABLES: dict[str, type[AnswerRows]] = {cls.table: cls for cls in (Samples, ValAnswers)}


def emit(path: Path, event: Event) -> None:
    """Append one event as one line (a reader never sees part of a line as a whole one)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(event.to_json()) + "\n")  # ASCII: a reader never splits a character


class EventReader:
    """Reads the events the training process appends, from where it last stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = ""

    def rewind(self) -> None:
        self.offset, self.partial = 0, ""

    def read(self) -> list[Event]:
        try:
            with self.path.open("r", encoding="utf-8") as f:
                f.seek(self.offset)
                chunk = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        lines = (self.partial + chunk).split("\n")
        self.partial = lines.pop()  # an incomplete last line waits for the next read
        raws = [json.loads(line) for line in lines if line.strip()]
        return [EVENTS[raw["kind"]].from_json(raw) for raw in raws if raw.get("kind") in EVENTS]


def read_events(path: Path) -> list[Event]:
    """Every event of a finished trial's stream."""
    return EventReader(path).read()


# -- the verdict after a validation point -------------------------------------------------------------


@dataclass
class Verdict:
    step: int
    stop: bool

    def write(self, path: Path) -> None:
        atomic.write_text(path, json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path) -> Verdict | None:
        try:
            raw = json.loads(path.read_text())
            return cls(int(raw["step"]), bool(raw["stop"]))
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None  # not written yet


# -- a resident worker's job and its result --------------------------------------------------------------


@dataclass
class Job:
    """One ``xtuner train`` run for a resident worker, sent as one line on its stdin."""

    argv: list[str]
    log: str
    done: str

    def to_line(self) -> bytes:
        return (json.dumps(asdict(self)) + "\n").encode()

    @classmethod
    def from_line(cls, line: str) -> Job:
        return cls(**json.loads(line))


#: The exit code a resident worker answers a job with that it did not start (one of its other jobs had failed):
#: the job goes to another worker.
NOT_STARTED = 75


@dataclass
class Done:
    """What a resident worker writes when a job ends: its exit code, and which worker ran it with what left."""

    rc: int
    pid: int = field(default_factory=os.getpid)
    job: int = 0  # the worker's how-many-th job
    model_reused: bool = False
    seconds: float = 0.0
    held: dict[str, float] = field(default_factory=dict)  # memory the worker still holds after the job

    def write(self, path: Path) -> None:
        """The trial reads this file as soon as it exists: it is written whole."""
        raw = {k: v for k, v in asdict(self).items() if k != "held"}
        atomic.write_text(path, json.dumps({**raw, **self.held}))

    @classmethod
    def read(cls, path: Path) -> Done | None:
        try:
            raw = json.loads(path.read_text())
            own = {f.name for f in fields(cls)} - {"held"}
            return cls(**{k: raw[k] for k in own if k in raw},
                       held={k: v for k, v in raw.items() if k not in own})  # fmt: skip
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def worker_info(self) -> dict[str, Any]:
        """Which worker trained the trial, its how-many-th job, whether the model was loaded, memory held."""
        return {"pid": self.pid, "job": self.job, "model_reused": self.model_reused, **self.held}


#: The process that imports the training stack once and forks the resident workers (``sweep.training.forkserver``).
FORKSERVER_MODULE = "sweep.training.forkserver"
#: The largest message either side reads: a request carries a worker's whole environment as JSON.
FORK_MESSAGE_MAX = 1 << 20
#: The environment a forked worker may hold other than its server's: what nothing reads before CUDA starts or the
#: worker applies itself (its thread count). Any other difference and the fork execs a fresh worker instead, since
#: modules read the rest when they are imported (``JOBS_AT_ONCE_ENV`` by the base-model cache, Hugging Face's
#: offline switches by their constants), and in a fork those imports already ran with the server's values.
FORK_PER_WORKER_ENV = frozenset(
    {"CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
     "PYTORCH_NVML_BASED_CUDA_CHECK"}
)  # fmt: skip


@dataclass
class Fork:
    """A request to the fork server: one worker, with this environment, sent with two descriptors (its stdin and its
    output) as one message of a ``SOCK_SEQPACKET`` socket. ``ref`` pairs the answer with the request."""

    ref: int
    env: dict[str, str]

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Fork:
        return cls(**json.loads(raw))


@dataclass
class ForkNews:
    """What the fork server tells the sweep, one message each.

    ``ready``: its imports are done (``pid``); ``unsafe``: they initialized CUDA, so no fork of it
    could use a GPU (``reason``), and it ends: the sweep starts its workers as processes of their own;
    ``forked``: request ``ref`` is worker ``pid``; ``refused``: request ``ref`` could not be forked (``reason``), and
    starts as a process of its own; ``exited``: worker ``pid`` ended with ``rc`` (negative: the signal).
    """

    kind: str
    ref: int = 0
    pid: int = 0
    rc: int = 0
    reason: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ForkNews:
        return cls(**json.loads(raw))
