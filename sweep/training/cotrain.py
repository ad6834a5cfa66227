"""Several trials trained over one frozen base model in one process, their steps joined into one pass.

A short LoRA trial leaves most of a GPU idle, and a process per trial holds its own copy of the base
weights and runs the base's matrix products at its own small batch. Here the trials a resident worker
trains at once (each its own XTuner runner in its own thread, ``sweep.training.worker``) share the base
weights (``shared_copy``: their module trees are their own, the tensors are one), and each training step
is one pass for every trial that is ready: their rows are stacked, the base runs once over all of them,
and each row goes through its own trial's LoRA layers (``RoutedLinear``). Each trial's loss is taken
over its own rows alone, one backward pass fills every trial's own gradients, and each trial's
optimizer (its learning rate, schedule, accumulation) steps in the trial's own thread.

A trial's math does not depend on the trials beside it: its rows and their order come from its own data
loader, its LoRA initialisation is drawn while it alone builds (``SETUP``), its dropout masks come from
a generator seeded by the trial's random seed, its step and the layer's name (the same in activation
checkpointing's recomputation), and its loss is the mean over its own tokens. Only the shapes of the base's products
change, which moves bf16 rounding, nothing else (``tests/training/test_cotrain.py`` proves it).

A trial joins at its first step and is away while it validates or saves (the others step on without
it); the pass runs when every trial that is not away has handed in its rows.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sweep.training import fused_loss
from sweep.training.amp import training_autocast

IGNORE_INDEX = -100
_COLUMNS = ("input_ids", "attention_mask", "position_ids", "labels")  # what a joined pass takes from a batch
# Held while a runner is built (it seeds torch's, numpy's and Python's global generators, then draws LoRA's init,
# the packing shuffle and the sampler's seed from them) and by every other use of those generators while trials
# train (validation, a data loader's next epoch): a trial's draws never depend on what runs beside it.
SETUP = threading.RLock()
_SHARED_FROM = "_sweep_shared_from"  # a shared copy's attribute: the model whose tensors it shares
_MIX = 0x9E3779B97F4A7C15  # spreads (trial, step, layer) over the generator's seeds


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that holds the very same parameters and buffers (no tensor is copied).

    Each trial injects its LoRA layers, hooks and checkpointing flags into its own copy; a change of a
    shared tensor's dtype in place (``param.data = ...``) is seen by every copy.
    """
    source = shared_from(model) or model
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    if source is not model:
        memo[id(source)] = source  # a copy of a copy points at the same source, not a copy of it
    twin = copy.deepcopy(model, memo)
    object.__setattr__(twin, _SHARED_FROM, source)  # a plain attribute: as a submodule, PEFT would inject into it
    return twin


def shared_from(model: nn.Module) -> nn.Module | None:
    """The model whose tensors ``model`` shares (None: it is no shared copy)."""
    return getattr(model, _SHARED_FROM, None)


def _lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """The trial's LoRA layers by the name of the base module they wrap (PEFT's prefix taken off)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    return {name: module for name, module in base.named_modules() if name and isinstance(module, LoraLayer)}


def why_not_joined(peft_model: nn.Module, optim_wrapper: Any) -> str | None:
    """Why this trial cannot take part in joined steps (None: it can)."""
    from mmengine.optim import AmpOptimWrapper, OptimWrapper
    from peft.tuners import lora

    if type(optim_wrapper) is not OptimWrapper and not isinstance(optim_wrapper, AmpOptimWrapper):
        return f"its optimizer wrapper is {type(optim_wrapper).__name__}"
    layers = _lora_layers(peft_model)
    if not layers:
        return "it has no LoRA layers"
    for name, layer in layers.items():
        adapters = list(layer.active_adapters)
        if len(adapters) != 1:
            return f"{name} has {len(adapters)} active adapters"
        if not isinstance(layer, lora.Linear) or adapters[0] not in layer.lora_A:
            return f"{name} is a {type(layer).__name__}, not a LoRA linear layer"
        if getattr(layer, "lora_variant", {}).get(adapters[0]) or layer.use_dora.get(adapters[0], False):
            return f"{name} is a LoRA variant (DoRA, ...)"
    trained = {id(p) for layer in layers.values() for part in (layer.lora_A, layer.lora_B) for p in part.parameters()}
    other = [n for n, p in peft_model.named_parameters() if p.requires_grad and id(p) not in trained]
    if other:
        return f"it trains parameters other than LoRA's ({other[0]}, ...)"
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if any(layer is head for layer in layers.values()):
        return "its output head has LoRA layers"
    return None


def why_not_model(model: Any) -> str | None:
    """What of the XTuner model (not its adapters) keeps a trial out of joined steps."""
    from xtuner.parallel.sequence import get_sequence_parallel_world_size

    if getattr(model, "use_varlen_attn", False):
        return "use_varlen_attn: its attention reads per-batch lengths from a process-wide message hub"
    if get_sequence_parallel_world_size() > 1:
        return "sequence parallel training"
    return None


def dropout_free(base: nn.Module) -> str | None:
    """Why the base model's own layers draw random numbers in training (None: only LoRA's dropout does)."""
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if getattr(getattr(base, "config", None), key, 0) not in (0, 0.0, None):
            return f"the base model's config sets {key}"
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in base.modules()):
        return "the base model has dropout layers of its own"
    return None


def guard_data_loaders() -> None:
    """A data loader's iterator (each epoch's) draws its seed from torch's global generator: under ``SETUP``."""
    from torch.utils.data import DataLoader

    original = DataLoader.__iter__
    if getattr(original, "_sweep_guarded", False):
        return

    def __iter__(self):
        with SETUP:
            return original(self)

    __iter__._sweep_guarded = True
    DataLoader.__iter__ = __iter__


@dataclass
class PassStats:
    """Where a joined trial's steps went: in passes, waiting for the other trials' rows, and with whom."""

    passes: int = 0
    trials: int = 0  # summed over its passes: trials / passes is how many it stepped with on average
    rows: int = 0  # rows of the passes it was in, every trial's
    pass_s: float = 0.0  # from the pass's start until it returned (its kernels launched, run when the GPU is behind)
    wait_s: float = 0.0  # from handing in its rows to its pass: others' hooks, optimizers, data, earlier passes

    def summary(self) -> dict[str, float]:
        n = max(self.passes, 1)
        return {"passes": self.passes, "trials_per_pass": round(self.trials / n, 2), "rows_per_pass":
                round(self.rows / n, 2), "pass_s": round(self.pass_s / n, 4), "wait_s": round(self.wait_s / n, 4)}  # fmt: skip


@dataclass(eq=False)
class Member:
    """One trial in the joined steps: its model, its LoRA layers and where its dropout masks come from."""

    model: Any  # the trial's XTuner model (SupervisedFinetune)
    layers: dict[str, nn.Module]
    seed: int
    loss_impl: str = "off"  # speed.fused_loss
    steps: int = 0
    away: bool = False
    optim_wrapper: Any = None
    stats: PassStats = field(default_factory=PassStats)
    submitted: float = 0.0  # when it handed in its rows for the next pass (perf_counter)

    def adapter(self, layer: nn.Module) -> str:
        return layer.active_adapters[0]

    def dropout_seed(self, layer: int) -> int:
        """The seed of this trial's mask at ``layer`` (a hash of the layer's name) in its current step."""
        return ((self.seed * _MIX) ^ (self.steps * 0x100000001B3) ^ (layer * 0xC2B2AE3D27D4EB4F)) & (2**63 - 1)


@dataclass
class _Segment:
    start: int
    end: int
    member: Member


class RoutedLinear(nn.Module):
    """A base linear layer of the joined pass: one product over every trial's rows, then each trial's own
    LoRA term on its rows, as PEFT's ``lora.Linear.forward`` computes it for that trial alone."""

    def __init__(self, base_layer: nn.Module, name: str, plan: list[_Segment]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.name, self.plan = name, plan
        self.index = zlib.crc32(name.encode())  # the layer's part of its masks' seed: the same whoever joined first
        self._generators: dict[torch.device, torch.Generator] = {}

    def _dropout(self, x: torch.Tensor, p: float, member: Member) -> torch.Tensor:
        if p == 0 or not self.training:
            return x
        gen = self._generators.get(x.device)
        if gen is None:
            gen = self._generators[x.device] = torch.Generator(device=x.device)
        gen.manual_seed(member.dropout_seed(self.index))  # the same mask again when checkpointing recomputes
        keep = torch.empty_like(x).bernoulli_(1 - p, generator=gen)
        return x * keep / (1 - p)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for seg in self.plan:
            layer = seg.member.layers.get(self.name)
            if layer is None:
                continue
            name = seg.member.adapter(layer)
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            dropout = layer.lora_dropout[name]
            xs = layer._cast_input_dtype(x[seg.start : seg.end], lora_a.weight.dtype)
            xs = self._dropout(xs, getattr(dropout, "p", 0.0), seg.member)
            term = lora_b(lora_a(xs)) * layer.scaling[name]
            if seg.start == 0 and seg.end == result.shape[0]:
                result = result + term  # one trial: PEFT's own sum
            else:  # in place, into rows of a product no backward pass reads: no copy of the whole output
                result[seg.start : seg.end] += term
        return result


class JoinedSteps:
    """The trials of one base model in this process and the passes that train them together. Thread-safe."""

    def __init__(self, base: nn.Module, checkpointing: bool) -> None:
        self.checkpointing = checkpointing
        self.joint = shared_copy(base)
        self.joint.requires_grad_(False)
        if checkpointing:  # the recomputation needs no global generator (``dropout_free``), so it leaves them alone
            self.joint.enable_input_require_grads()
            self.joint.gradient_checkpointing_enable({"use_reentrant": True, "preserve_rng_state": False})
        self.joint.train()
        self.plan: list[_Segment] = []
        self.routed: dict[str, RoutedLinear] = {}
        self.members: list[Member] = []
        self._cond = threading.Condition()
        self._pending: dict[Member, tuple[dict, Any]] = {}
        self._results: dict[Member, torch.Tensor | BaseException] = {}
        self._running = False
        self._device: torch.device | None = None

    # -- membership ---------------------------------------------------------------------------
    def join(self, model: Any, optim_wrapper: Any, seed: int, loss_impl: str = "off") -> Member:
        """Add a trial (its LoRA layers are routed from now on) and return its handle."""
        layers = _lora_layers(model.llm)
        with self._cond:
            for name in layers:
                if name not in self.routed:
                    self._route(name)
            member = Member(model, layers, seed, loss_impl, optim_wrapper=optim_wrapper)
            self.members.append(member)
        return member

    def _route(self, name: str) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.joint.get_submodule(parent_name) if parent_name else self.joint
        routed = RoutedLinear(getattr(parent, child), name, self.plan)
        setattr(parent, child, routed)
        self.routed[name] = routed

    def leave(self, member: Member) -> None:
        """The trial ended (or failed): the others no longer wait for it."""
        with self._cond:
            if member in self.members:
                self.members.remove(member)
            self._cond.notify_all()

    @contextlib.contextmanager
    def away(self, member: Member) -> Iterator[None]:
        """While the trial validates or saves, the others step without it."""
        with self._cond:
            member.away = True
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                member.away = False

    # -- one step -----------------------------------------------------------------------------
    def train_step(self, member: Member, data: dict, optim_wrapper: Any) -> dict[str, torch.Tensor]:
        """What ``BaseModel.train_step`` does for this trial, with its forward and backward in a joined pass."""
        model = member.model
        with optim_wrapper.optim_context(model):
            data = model.data_preprocessor(data, True)
        loss = self._submit(member, data["data"], optim_wrapper)
        if optim_wrapper.should_update():
            optim_wrapper.step()
            optim_wrapper.zero_grad()
        return {"loss": loss}

    def _ready(self) -> bool:
        waiting = [m for m in self.members if not m.away]
        return not self._running and bool(self._pending) and all(m in self._pending for m in waiting)

    def _submit(self, member: Member, data: dict, optim_wrapper: Any) -> torch.Tensor:
        unknown = set(data) - set(_COLUMNS)
        if unknown:  # refused here, before the rows join a pass that would fail every trial in it
            raise ValueError(f"joined steps take {list(_COLUMNS)} from the data loader, not {sorted(unknown)}")
        with self._cond:
            if member not in self.members:
                raise RuntimeError("this trial left the joined steps")
            self._pending[member] = (data, optim_wrapper)
            member.submitted = time.perf_counter()
            self._cond.notify_all()
            while member not in self._results:
                if self._ready():
                    batch = [(m, *self._pending.pop(m)) for m in self.members if m in self._pending]
                    self._running = True
                    self._cond.release()
                    try:
                        outcome: dict[Member, Any] = self._step(batch)
                    except BaseException as exc:  # noqa: BLE001 - every trial of the pass gets the error
                        outcome = {m: exc for m, _, _ in batch}
                    finally:
                        self._cond.acquire()
                        self._running = False
                    self._results.update(outcome)
                    self._cond.notify_all()
                else:
                    self._cond.wait()
            result = self._results.pop(member)
        if isinstance(result, BaseException):
            raise result
        return result

    def _step(self, batch: list[tuple[Member, dict, Any]]) -> dict[Member, torch.Tensor]:
        """One joined pass per row length and autocast among the trials ready: rows are never padded to another
        trial's length (its activation memory would grow with it), and each runs under its own trial's autocast."""
        groups: dict[tuple, list[tuple[Member, dict, Any]]] = {}
        for item in batch:
            data, wrapper = item[1], item[2]
            key = (data["input_ids"].shape[1], type(wrapper).__name__, str(getattr(wrapper, "cast_dtype", None)))
            groups.setdefault(key, []).append(item)
        out = {}
        for group in groups.values():
            out.update(self._pass(group))
        return out

    def _pass(self, batch: list[tuple[Member, dict, Any]]) -> dict[Member, torch.Tensor]:
        """Forward and backward of rows of one length, each through its own trial's LoRA layers."""
        began = time.perf_counter()
        self.plan.clear()
        row = 0
        for member, data, _ in batch:
            self.plan.append(_Segment(row, row + data["input_ids"].shape[0], member))
            row = self.plan[-1].end
        keys = [key for key in _COLUMNS if all(data.get(key) is not None for _, data, _ in batch)]
        joined = {key: torch.cat([data[key] for _, data, _ in batch]) for key in keys}
        labels = joined.pop("labels")
        device = joined["input_ids"].device
        if self._device != device:
            # the runners moved their trials' models: the shared weights moved with the first (in place), but each
            # copy's buffers (the rotary tables) are its own and these are still where the base model was loaded
            self.joint.to(device)
            self._device = device
        head = self.joint.get_output_embeddings()
        try:
            with training_autocast(batch[0][2]):
                hidden = fused_loss._decoder(self.joint)(**joined, use_cache=False, return_dict=True).last_hidden_state
                losses = [
                    _loss(hidden[seg.start : seg.end], labels[seg.start : seg.end], head, seg.member.loss_impl)
                    for seg in self.plan
                ]
            scaled = []
            for loss, (_, _, optim_wrapper) in zip(losses, batch, strict=True):
                part = optim_wrapper.scale_loss(loss)
                if hasattr(optim_wrapper, "loss_scaler"):
                    part = optim_wrapper.loss_scaler.scale(part)
                scaled.append(part)
            torch.autograd.backward(scaled)
        finally:
            self.plan.clear()
        out = {}
        for loss, (member, _, optim_wrapper) in zip(losses, batch, strict=True):
            optim_wrapper._inner_count += 1  # what OptimWrapper.backward counts
            member.steps += 1
            out[member] = loss.detach()
        _count(batch, began, time.perf_counter())
        return out


def _count(batch: list[tuple[Member, dict, Any]], began: float, ended: float) -> None:
    rows = sum(data["input_ids"].shape[0] for _, data, _ in batch)
    for member, _, _ in batch:
        stats = member.stats
        stats.passes += 1
        stats.trials += len(batch)
        stats.rows += rows
        stats.pass_s += ended - began
        stats.wait_s += max(0.0, began - member.submitted)


def _loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, impl: str) -> torch.Tensor:
    """The trial's loss on its own rows: Transformers' ``ForCausalLMLoss``, or its ``speed.fused_loss``."""
    if impl != "off":
        return fused_loss.LOSSES[impl](hidden[:, :-1].contiguous(), head.weight, labels[:, 1:].contiguous(), head.bias)
    logits = head(hidden).float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


@dataclass
class _Registry:
    """This process's joined steps, one per shared base model, and the member each job thread is."""

    steps: dict[int, JoinedSteps] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    local: threading.local = field(default_factory=threading.local)

    def joined_steps(self, base: nn.Module, checkpointing: bool) -> JoinedSteps:
        """The group of this base model's trials that checkpoint activations as ``checkpointing`` says."""
        with self.lock:
            key = (id(base), checkpointing)
            found = self.steps.get(key)
            if found is None:
                found = self.steps[key] = JoinedSteps(base, checkpointing)
            return found


REGISTRY = _Registry()


def join(model: Any, optim_wrapper: Any, loss_impl: str = "off") -> tuple[JoinedSteps, Member]:
    """Put this thread's trial into the joined steps of its base model (trials that checkpoint activations and trials
    that do not step in separate groups).

    Its ``train_step`` goes through the joined pass from now on; ``leave`` (or ``leave_thread``) undoes it. A trial
    that cannot join raises: trained beside others on its own, its dropout would draw from the global generators that
    its neighbours' set-ups seed, and its result would depend on them.
    """
    llm = model.llm
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    source = shared_from(base)
    if source is None:
        raise ValueError("its base model is its own (this worker does not share one)")
    reason = why_not_model(model) or why_not_joined(llm, optim_wrapper) or dropout_free(source)
    if reason is not None:
        raise ValueError(f"speed.trials_per_worker > 1 trains trials at once with joined steps, which this trial "
                         f"cannot take part in: {reason}; set speed.trials_per_worker: 1")  # fmt: skip
    checkpointing = bool(getattr(base, "is_gradient_checkpointing", False))
    steps = REGISTRY.joined_steps(source, checkpointing)
    member = steps.join(model, optim_wrapper, torch.initial_seed(), loss_impl)
    model.train_step = lambda data, optim_wrapper: steps.train_step(member, data, optim_wrapper)
    REGISTRY.local.joined = (steps, member)
    return steps, member


def current() -> tuple[JoinedSteps, Member] | None:
    """This thread's trial in joined steps, if it is in one."""
    return getattr(REGISTRY.local, "joined", None)


def away() -> contextlib.AbstractContextManager:
    """Step without this thread's trial for a while (validation, saving); nothing when it is not joined."""
    found = current()
    return found[0].away(found[1]) if found else contextlib.nullcontext()


def leave_thread() -> dict[str, float] | None:
    """This thread's trial is done: the others stop waiting for it, and its model gets its own step back.
    Returns where its joined steps went (``PassStats.summary``), None when it was not joined."""
    found = current()
    if found is None:
        return None
    steps, member = found
    steps.leave(member)
    vars(member.model).pop("train_step", None)
    REGISTRY.local.joined = None
    return member.stats.summary()
