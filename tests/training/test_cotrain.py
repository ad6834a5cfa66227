"""Joined steps: a trial trained beside others over one shared base model gives what it gives alone.

Real XTuner models (``SupervisedFinetune`` with PEFT LoRA) over shared copies of the tiny model, real mmengine
optimizer wrappers, trials stepping from their own threads as a resident worker runs them. The bf16 cases load the
weights in bf16 and train under CPU autocast, with the frozen weights back in 16 bits, as a GPU trial does.
"""

from __future__ import annotations

import threading

import pytest
import torch
from mmengine.optim import OptimWrapper
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from xtuner.model import SupervisedFinetune
from xtuner.model.modules import dispatch_modules

from sweep.training import cotrain
from sweep.training.amp import CpuAmpOptimWrapper, keep_frozen_weights_16bit
from sweep.training.base_model import upcast_like_peft

TRIALS = [  # rank, alpha, learning rate, rows a step, tokens a row: every trial its own shapes
    dict(r=8, alpha=16, lr=1e-3, rows=2, length=48, seed=1),
    dict(r=4, alpha=8, lr=3e-3, rows=1, length=40, seed=2),
    dict(r=16, alpha=16, lr=5e-4, rows=3, length=48, seed=3),
]
STEPS = 4


class _Model(SupervisedFinetune):
    """XTuner's model around a model object (its own ``build_llm_from_cfg`` takes configs only), as the worker's
    base-model cache hands it one."""

    def build_llm_from_cfg(self, llm_cfg, use_varlen_attn, max_position_embeddings):
        llm_cfg.config.use_cache = False
        dispatch_modules(llm_cfg, use_varlen_attn=use_varlen_attn)
        return llm_cfg


def _base(path, bf16: bool):
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16 if bf16 else torch.float32)
    upcast_like_peft(model)  # what the worker's cache does once for the shared base
    return model


def _trial(base, spec: dict, *, dropout: float, bf16: bool, checkpointing: bool, accumulate: int = 1):
    torch.manual_seed(spec["seed"])
    # A and B random (not PEFT's B = 0): the first step's loss already has every trial's LoRA term in it
    lora = LoraConfig(
        r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=dropout, task_type="CAUSAL_LM", init_lora_weights=False
    )
    model = _Model(llm=cotrain.shared_copy(base), lora=lora, use_activation_checkpointing=checkpointing)
    model.train()
    if bf16:
        keep_frozen_weights_16bit(model.llm)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    wrapper = CpuAmpOptimWrapper(optimizer=optimizer, accumulative_counts=accumulate) if bf16 else \
        OptimWrapper(optimizer=optimizer, accumulative_counts=accumulate)  # fmt: skip
    return model, wrapper


def _batches(spec: dict, vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(100 + spec["seed"])
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, vocab, (spec["rows"], spec["length"]), generator=gen)
        labels = ids.clone()
        labels[:, : spec["length"] // 3] = -100  # the prompt's tokens carry no loss
        out.append({"data": {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
                             "position_ids": torch.arange(spec["length"]).expand(spec["rows"], -1)},
                    "data_samples": None})  # fmt: skip
    return out


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _updates(model, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What training changed in each LoRA weight (compared, not the weights: small updates hide in large weights)."""
    return {n: value - before[n] for n, value in _lora_state(model).items()}


def _run_group(steps, members, built, specs, vocab: int, results: dict) -> None:
    """Each trial of the group from its own thread, as a resident worker runs jobs at once."""
    errors: list[BaseException] = []

    before = {i: _lora_state(built[i][0]) for i in members}

    def run(i: int) -> None:
        losses = []
        try:
            for batch in _batches(specs[i], vocab):
                losses.append(float(steps.train_step(members[i], batch, built[i][1])["loss"]))
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)
        finally:
            steps.leave(members[i])
        results[i] = (losses, _updates(built[i][0], before[i]), members[i].stats.summary())

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a trial still waits: the joined steps hang"
    assert not errors, errors


def _train(path, specs, *, together: bool, dropout=0.1, bf16=False, checkpointing=False, accumulate=1):
    """Each trial's losses and final LoRA weights, trained together (one base, threads) or each alone."""
    results: dict[int, tuple[list[float], dict]] = {}
    groups = [list(range(len(specs)))] if together else [[i] for i in range(len(specs))]
    for group in groups:
        base = _base(path, bf16)
        built = {i: _trial(base, specs[i], dropout=dropout, bf16=bf16, checkpointing=checkpointing,
                           accumulate=accumulate) for i in group}  # fmt: skip
        steps = cotrain.JoinedSteps(base, checkpointing)
        members = {i: steps.join(built[i][0], built[i][1], specs[i]["seed"]) for i in group}
        _run_group(steps, members, built, specs, base.config.vocab_size, results)
    return results


def _assert_same(a, b, rtol: float) -> None:
    """The same losses, and the same updates of every LoRA weight, relative to the update's own size."""
    for i in a:
        assert a[i][0] == pytest.approx(b[i][0], rel=rtol), f"trial {i}'s losses"
        for name in a[i][1]:
            change, expected = a[i][1][name], b[i][1][name]
            assert expected.norm() > 0, f"trial {i}: {name} never changed"
            assert (change - expected).norm() <= rtol * expected.norm(), f"trial {i}: {name}"


def test_fp32_trials_together_equal_alone(tiny_model):
    together = _train(tiny_model, TRIALS, together=True)
    alone = _train(tiny_model, TRIALS, together=False)
    assert all(len(together[i][0]) == STEPS for i in together)
    _assert_same(together, alone, rtol=1e-5)
    # trials 0 and 2 (rows of 48 tokens: 2 + 3 a step) share every pass; trial 1's rows of 40 tokens pass on their own
    assert [together[i][2]["passes"] for i in range(3)] == [STEPS] * 3
    assert [together[i][2]["trials_per_pass"] for i in range(3)] == [2, 1, 2]
    assert [together[i][2]["rows_per_pass"] for i in range(3)] == [5, 1, 5]


def test_bf16_autocast_trials_together_equal_alone_within_bf16_tolerance(tiny_model):
    together = _train(tiny_model, TRIALS, together=True, bf16=True)
    alone = _train(tiny_model, TRIALS, together=False, bf16=True)
    _assert_same(together, alone, rtol=2e-2)


def test_checkpointing_recomputes_the_same_dropout_masks(tiny_model):
    """Gradients after recomputation match those of a pass that kept its activations: the masks were redrawn equal."""
    on = _train(tiny_model, TRIALS, together=True, dropout=0.3, checkpointing=True)
    off = _train(tiny_model, TRIALS, together=True, dropout=0.3, checkpointing=False)
    _assert_same(on, off, rtol=1e-5)


def test_alone_without_dropout_is_stock_xtuner(tiny_model):
    """With no dropout, a joined step is exactly mmengine's own train_step of the same XTuner model."""
    spec = TRIALS[0]
    joined = _train(tiny_model, [spec], together=True, dropout=0.0, accumulate=2)[0]
    model, wrapper = _trial(_base(tiny_model, False), spec, dropout=0.0, bf16=False, checkpointing=False, accumulate=2)
    before = _lora_state(model)
    losses = [float(model.train_step(batch, wrapper)["loss"]) for batch in _batches(spec, model.llm.config.vocab_size)]
    _assert_same({0: joined}, {0: (losses, _updates(model, before))}, rtol=1e-5)


def test_a_failing_pass_fails_every_trial_in_it_and_nobody_waits_forever(tiny_model):
    base = _base(tiny_model, False)
    steps = cotrain.JoinedSteps(base, False)
    built = [_trial(base, spec, dropout=0.0, bf16=False, checkpointing=False) for spec in TRIALS[:2]]
    members = [steps.join(model, wrapper, 0) for model, wrapper in built]
    bad = _batches(TRIALS[0], base.config.vocab_size)[0]
    bad["data"]["input_ids"] = bad["data"]["input_ids"] + 10**6  # past the vocabulary: the embedding raises
    good = _batches(TRIALS[1], base.config.vocab_size)[0]
    raised: list[str] = []

    def run(i: int, batch: dict) -> None:
        try:
            steps.train_step(members[i], batch, built[i][1])
        except (IndexError, RuntimeError) as exc:
            raised.append(type(exc).__name__)
        finally:
            steps.leave(members[i])

    threads = [threading.Thread(target=run, args=(0, bad)), threading.Thread(target=run, args=(1, good))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert len(raised) == 2


def test_a_trial_away_is_not_waited_for(tiny_model):
    base = _base(tiny_model, False)
    steps = cotrain.JoinedSteps(base, False)
    built = [_trial(base, spec, dropout=0.0, bf16=False, checkpointing=False) for spec in TRIALS[:2]]
    members = [steps.join(model, wrapper, 0) for model, wrapper in built]
    with steps.away(members[1]):
        out = steps.train_step(members[0], _batches(TRIALS[0], base.config.vocab_size)[0], built[0][1])
    assert torch.isfinite(out["loss"])
    assert members[0].steps == 1 and members[1].steps == 0


def test_shared_copies_hold_one_set_of_weights(tiny_model):
    base = _base(tiny_model, True)
    one, two = cotrain.shared_copy(base), cotrain.shared_copy(base)
    assert one is not two and one.model.layers[0] is not two.model.layers[0]
    assert one.model.layers[0].self_attn.q_proj.weight is base.model.layers[0].self_attn.q_proj.weight
    assert cotrain.shared_from(one) is base and cotrain.shared_from(cotrain.shared_copy(one)) is base
    base.model.layers[0].self_attn.q_proj.weight.data = base.model.layers[0].self_attn.q_proj.weight.data.bfloat16()
    assert two.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # a dtype change reaches every copy


def test_the_joined_pass_follows_the_trials_to_their_device(tiny_model):
    """On a GPU the runner moves its trial's model after the base was loaded on the CPU: the shared weights move for
    every copy (in place), a copy's buffers (the rotary tables) only in that copy. The joined pass must run where the
    rows are (it failed on an H100 with cuda:0 weights and a CPU rotary table). Here the move is to the meta device,
    where the forward pass stops at its first ``.item()``: after the joined tree should have followed."""
    base = _base(tiny_model, False)
    model, wrapper = _trial(base, TRIALS[0], dropout=0.0, bf16=False, checkpointing=False)
    steps = cotrain.JoinedSteps(base, False)  # made before the move, as in a worker whose trials arrive one by one
    member = steps.join(model, wrapper, 0)
    model.to("meta")
    batch = _batches(TRIALS[0], base.config.vocab_size)[0]["data"]
    assert {b.device.type for b in steps.joint.buffers()} == {"cpu"}, "the copy's own buffers stayed behind"
    with pytest.raises(RuntimeError):
        steps._step([(member, {k: v.to("meta") for k, v in batch.items()}, wrapper)])
    assert {b.device.type for b in steps.joint.buffers()} == {"meta"}


def test_a_trial_that_cannot_join_is_refused_with_its_reason(tiny_model):
    """Trained beside the others on its own, such a trial's dropout would draw from generators its neighbours seed."""
    base = _base(tiny_model, False)
    model, wrapper = _trial(base, TRIALS[0], dropout=0.1, bf16=False, checkpointing=False)
    model.use_varlen_attn = True  # its attention would read another trial's lengths from a process-wide hub
    with pytest.raises(ValueError, match="use_varlen_attn.*set speed.trials_per_worker: 1"):
        cotrain.join(model, wrapper)
    model.use_varlen_attn = False
    norm = model.llm.get_base_model().model.norm.weight
    norm.requires_grad_(True)  # as PEFT's modules_to_save would train it: no joined pass gives it a gradient
    with pytest.raises(ValueError, match="trains parameters other than LoRA's"):
        cotrain.join(model, wrapper)
    norm.requires_grad_(False)
    steps, member = cotrain.join(model, wrapper)
    assert member in steps.members and cotrain.current() == (steps, member)
    cotrain.leave_thread()
    assert member not in steps.members and "train_step" not in vars(model)
