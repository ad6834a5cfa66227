"""The step-speed levers (``speed.fused_loss``, ``speed.compile``) change how fast a step runs, never its math.

Each is checked on the tiny model against the plain Transformers/PEFT step, in bf16 autocast (the dtypes a GPU
trains LoRA in) and in fp32, and once through a real sweep trial with ``cpu_amp: true``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sweep.spec import SpecError, load_spec
from sweep.training import compiled, fused_loss
from tests.conftest import ROOT, write_spec


def _lora_model(tiny_model: Path, dtype: torch.dtype, dropout: float = 0.0):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=dropout))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data = param.data.float()  # PEFT's upcast of trainable weights, as XTuner's LoRA models have
            if "lora_B" in name:
                param.normal_(0, 0.02)  # a trained adapter: B no longer zero, so LoRA takes part in the loss
    return base, model


def _loss_and_grads(model, ids, labels, amp: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("amp", [True, False], ids=["bf16-autocast", "fp32"])
def test_chunked_loss_is_the_transformers_loss(tiny_model, monkeypatch, amp):
    base, model = _lora_model(tiny_model, torch.bfloat16 if amp else torch.float32)
    ids = torch.randint(0, base.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :10] = -100  # the prompt: not trained on
    labels[1, 50:60] = -100
    model.train()
    want, want_grads = _loss_and_grads(model, ids, labels, amp)
    monkeypatch.setattr(fused_loss, "CHUNK_TOKENS", 50)  # several chunks, one of them partial
    fused_loss.install(base, "chunked")
    got, got_grads = _loss_and_grads(model, ids, labels, amp)
    assert got == pytest.approx(want, rel=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) == 16  # A and B of q and v in 4 layers
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-3, atol=1e-6), name

    model.eval()  # validation: the class's forward, logits and all
    with torch.no_grad():
        assert model(input_ids=ids, labels=labels).logits.shape == (*ids.shape, base.config.vocab_size)
    fused_loss.uninstall(base)
    assert "forward" not in vars(base) and not hasattr(base, "_sweep_fused_loss")


def test_a_fused_loss_that_cannot_run_says_why(tiny_model):
    base, _ = _lora_model(tiny_model, torch.float32)
    with pytest.raises(ValueError, match="cce runs on CUDA GPUs only"):
        fused_loss.install(base, "cce")
    base.config.logit_scale = 0.5  # Cohere-style scaled logits: the fused loss would compute something else
    assert "scales or caps its logits" in fused_loss.why_not(base, "chunked")


def test_compiled_layers_train_to_the_same_losses_with_lora_dropout(tiny_model):
    """Inductor draws dropout masks from its own generator unless told not to: with LoRA dropout on, compiled
    steps would then leave the eager ones after the first update."""
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(1))

    def train(compile_: bool) -> list[float]:
        base, model = _lora_model(tiny_model, torch.float32, dropout=0.1)
        compiled.use_compiled_layers(base, compile_)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(123)
        losses = []
        model.train()
        before = torch._dynamo.utils.counters["frames"]["ok"]
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        frames = torch._dynamo.utils.counters["frames"]["ok"]
        assert (frames > before) is compile_, "training steps ran compiled exactly when asked"
        model.eval()
        with torch.no_grad():
            model(input_ids=ids[:, :17])  # another length: eager, no recompile
        assert torch._dynamo.utils.counters["frames"]["ok"] == frames, "validation must not run compiled"
        return losses

    eager, fast = train(False), train(True)
    assert fast == pytest.approx(eager, rel=1e-5), (eager, fast)
    assert eager[2] < eager[0], "the steps trained"


def test_compiled_layers_keep_the_eager_bf16_curve_only_with_exact_casts(tiny_model):
    """In bf16 autocast, inductor fuses pointwise chains in fp32 where eager rounds each result to bf16: the
    compiled curve then leaves the eager one by rounding (the offset the H200 showed, docs/benchmarks.md).
    ``compile_exact_casts`` keeps eager's roundings; ``compile_dropout: fused`` draws other masks."""
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(1))

    def train(compile_: bool, dropout: float = 0.0, **options: bool) -> list[float]:
        base, model = _lora_model(tiny_model, torch.bfloat16, dropout=dropout)  # frozen weights bf16, LoRA fp32
        compiled.use_compiled_layers(base, compile_, **options)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(123)
        losses = []
        model.train()
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    def largest_gap(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) / y for x, y in zip(a, b, strict=True))

    eager = train(False)
    assert eager[3] < eager[0], "the steps trained"
    exact = train(True, exact_casts=True)
    # not tighter: on a CPU with AMX-BF16 the exact curve left eager's by more than 5e-5 (the compiled and eager
    # matmuls need not add up in one order), still far below the fused casts' gap (docs/benchmarks.md, 2026-12-07)
    assert largest_gap(exact, eager) < 1.5e-4, (eager, exact)
    fused_casts = train(True)  # inductor's default: the bf16 round trips between fused ops elided
    assert largest_gap(fused_casts, eager) > 5e-4, (eager, fused_casts)

    eager_dropout = train(False, dropout=0.1)
    fused_dropout = train(True, dropout=0.1, fused_dropout=True, exact_casts=True)
    assert largest_gap(eager_dropout, eager) > 5e-4, "the dropout changed the curve"
    assert 5e-4 < largest_gap(fused_dropout, eager_dropout) < 2e-2, (eager_dropout, fused_dropout)  # other masks


def test_one_compiled_graph_serves_every_batch_size_above_one(tiny_model):
    """A sweep's trials differ in batch size, and each static graph was a full compile (docs/benchmarks.md). With
    the batch marked dynamic, batch 3's graph also runs batch 2 and 4, to eager's loss in bf16 autocast. The
    positions come in with a batch dimension (as XTuner's varlen attention passes them): RoPE's cos and sin then
    carry it too, and must be marked with the hidden states."""
    base, model = _lora_model(tiny_model, torch.bfloat16)
    model.config.use_cache = False  # as XTuner trains (SupervisedFinetune sets it)
    compiled.use_compiled_layers(base, True, exact_casts=True)
    model.train()
    frames = torch._dynamo.utils.counters["frames"]

    def loss_at(batch: int) -> float:
        ids = torch.randint(0, 1000, (batch, 32), generator=torch.Generator().manual_seed(batch))
        positions = torch.arange(32).expand(batch, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, position_ids=positions).loss
        loss.backward()
        model.zero_grad()
        return loss.item()

    before = frames["ok"]
    loss_at(3)
    after_first = frames["ok"]
    assert after_first > before, "the first training step compiled"
    compiled_losses = {batch: loss_at(batch) for batch in (2, 4)}
    assert frames["ok"] == after_first, "batch 2 and 4 ran batch 3's graph: no new compile"
    loss_at(1)
    assert frames["ok"] > after_first, "batch 1 has a graph of its own (dynamo specialises sizes 0 and 1)"
    compiled.use_compiled_layers(base, False)
    for batch, got in compiled_losses.items():
        assert got == pytest.approx(loss_at(batch), rel=1.5e-4), batch


def test_model_train_walks_the_model_again_only_after_a_mode_change(tiny_model, monkeypatch, request):
    """mmengine calls ``model.train()`` before every iteration; the walk is skipped while no module's mode was
    set since. A validation point's ``eval()`` must still leave every module, LoRA's dropout included, training
    again at the next ``train()``: else the steps after it would train without dropout (bf16 autocast here)."""
    from sweep.training import patches

    monkeypatch.setattr(torch.nn.Module, "train", torch.nn.Module.train)  # undone after the test
    handle = patches._train_mode_walked_on_change()
    assert handle is not None, "installed here (no training process in this one)"
    request.addfinalizer(handle.remove)  # and the module registration hook with it
    base, model = _lora_model(tiny_model, torch.bfloat16, dropout=0.5)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts, "LoRA's dropout modules"

    def loss(seed: int) -> float:
        torch.manual_seed(seed)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids).loss.item()

    def boom(mode: bool = True):
        raise AssertionError("walked")

    model.train()
    loss(0)  # a training forward: Qwen2's slices its ModuleList of layers, attaching each to a new list
    dropouts[0].train = boom  # a walk would call it
    model.train()  # nothing left training mode since the walk: skipped
    dropouts[-1].eval()  # any module's mode set: the next train() walks
    with pytest.raises(AssertionError, match="walked"):
        model.train()
    del dropouts[0].train
    model.train()
    assert all(m.training for m in model.modules())
    model.late = torch.nn.Dropout(0.1).eval()  # attached after the walk, in eval mode: the next train() walks
    model.train()
    assert model.late.training

    other = torch.nn.Sequential(torch.nn.Dropout(0.1))  # another job's model in the same process
    other.train()
    model.train()
    other[0].train = dropouts[0].train = boom
    model.train()  # one job's walk leaves the other's record current: both skip
    other.train()
    del other[0].train, dropouts[0].train

    model.eval()  # a validation point: every module evaluates, always walked
    assert not any(m.training for m in model.modules())
    assert loss(1) == loss(2), "no dropout in eval mode"
    model.train()
    assert all(m.training for m in model.modules())
    assert loss(1) != loss(2), "dropout draws again in training mode"


def test_gpu_only_fused_losses_are_refused_before_anything_runs(tmp_path, tiny_model):
    from sweep.preflight import check
    from sweep.xtuner.render import Device

    spec = load_spec(write_spec(tmp_path, tiny_model, speed="speed: {fused_loss: off, activation_checkpointing: on}"))
    assert (spec.speed.fused_loss, spec.speed.activation_checkpointing) == ("off", "on"), "YAML's on/off booleans"
    spec = load_spec(write_spec(tmp_path, tiny_model, speed="speed: {fused_loss: cce}"))
    assert spec.speed.fused_loss == "cce"
    with pytest.raises(SpecError, match="speed.fused_loss: cce runs on CUDA GPUs only"):
        check(spec, Device(cuda=False))


def _train_losses(tmp_path: Path, tiny_model: Path, fused: str, speed: str = "") -> dict[int, float]:
    from sweep import study as study_mod

    ws = tmp_path / (fused + speed.replace(":", "").replace(" ", "_").replace(",", ""))
    ws.mkdir()
    spec = load_spec(
        write_spec(
            ws,
            tiny_model,
            study=f"study: lever-{ws.name}",
            n_trials="n_trials: 1",
            pruner="pruner: {type: none}",
            search_space="search_space: {lr: {type: categorical, choices: [0.003]}}",
            fixed="fixed: {max_length: 64, max_iters: 8, batch_size: 2, lora_r: 8, lora_dropout: 0.0}",
            eval_every="eval_every: 8",
            speed=f"speed: {{fused_loss: {fused}{', ' + speed if speed else ''}}}",
            extra="cpu_amp: true",
        )  # fmt: skip
    )
    opts = study_mod.RunOptions(storage=f"sqlite:///{ws / 'sweep.db'}", tracking_uri=f"sqlite:///{ws / 'mlflow.db'}",
                                work_dir=ws / "runs")  # fmt: skip
    study_mod.run(spec, opts)
    stream = ws / "runs" / f"lever-{ws.name}" / "trial_0000" / "sweep_metrics.jsonl"
    events = [json.loads(line) for line in stream.read_text().splitlines()]
    start = next(e for e in events if e["kind"] == "start")
    assert start["fused_loss"] == fused
    return {e["iter"]: e["train/loss"] for e in events if e["kind"] == "train"}


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model) -> dict[int, float]:
    """The reference curve every lever is compared with: no lever, trained once for the module."""
    folder = tmp_path_factory.mktemp("plain")
    losses = _train_losses(folder, tiny_model, "off")
    (config,) = folder.rglob("trial_0000/config.py")  # the trial's own (mmengine and MLflow keep copies)
    assert "'fused': True" not in config.read_text() and "'num_workers': 2" not in config.read_text()
    assert _worker_lines(folder) == ["forked"], "trained by a worker forked from the fork server (the default)"
    return losses


def _worker_lines(folder: Path) -> list[str]:
    """How each resident worker under ``folder`` started: forked from the fork server, or on its own."""
    texts = [log.read_text() for log in sorted(folder.rglob("workers/worker-*.log"))]
    return ["forked" if "(forked from" in text else "own" for text in texts if ": ready at" in text]


@pytest.mark.e2e
def test_a_forked_worker_trains_the_same_curve_in_bf16_as_a_worker_started_on_its_own(tmp_path, tiny_model, plain):
    """A fork inherits the server's imported state (torch's thread pool sized by the server's environment, the RNGs
    before any seeding, patched classes): the bf16 AMP trial must train to the same losses, to the bit."""
    own = _train_losses(tmp_path, tiny_model, "off", "fork_workers: off")
    assert _worker_lines(tmp_path) == ["own"] and not list(tmp_path.rglob("workers/forkserver-*.log"))
    assert own == plain


@pytest.mark.e2e
def test_a_trial_with_the_chunked_loss_trains_the_same_curve_in_bf16(tmp_path, tiny_model, plain):
    fused = _train_losses(tmp_path, tiny_model, "chunked")
    assert len(plain) == 8 and plain.keys() == fused.keys()
    for it, loss in plain.items():
        assert fused[it] == pytest.approx(loss, abs=2e-2), f"iteration {it}: {plain} vs {fused}"


@pytest.mark.e2e
def test_the_fused_optimizer_and_data_workers_train_the_same_curve_in_bf16(tmp_path, tiny_model, plain):
    """torch's fused AdamW under the bf16 AMP wrapper (GradScaler, clipping) takes the same steps as its loop;
    batches collated in DataLoader worker processes are the same batches, in the same order."""
    fused = _train_losses(tmp_path, tiny_model, "off", "fused_optimizer: true")
    loaders = _train_losses(tmp_path, tiny_model, "off", "data_workers: 2")
    configs = [p.read_text() for p in tmp_path.rglob("config.py")]
    assert sum("'fused': True" in text for text in configs) == 1, "the fused trial, and only it, renders fused=True"
    assert sum("'num_workers': 2" in text for text in configs) == 1, "the data-workers trial, and only it, has them"
    assert len(plain) == 8 and plain.keys() == fused.keys()
    for it, loss in plain.items():
        assert fused[it] == pytest.approx(loss, abs=2e-3), f"iteration {it}: {plain} vs {fused}"
    assert loaders == plain, "the same batches in the same order give the same losses, to the bit"
    assert plain[8] < plain[1] - 0.05, f"the curve must move for the comparison to mean anything: {plain}"


@pytest.mark.e2e
def test_a_trial_with_lora_input_16bit_trains_the_same_curve_in_bf16(tmp_path, tiny_model, plain):
    """Through a real sweep trial (bf16 weights, bf16 AMP on the CPU, no dropout): the same losses to the bit, and
    the trial's start event says how many LoRA layers took their input as it came."""
    losses = _train_losses(tmp_path, tiny_model, "off", "lora_input_16bit: on")
    assert losses == plain
    (stream,) = tmp_path.rglob("trial_0000/sweep_metrics.jsonl")
    start = next(e for e in map(json.loads, stream.read_text().splitlines()) if e["kind"] == "start")
    assert start["lora_input_16bit"] > 0 and start["fused_kernels"] == 0


def test_an_optimizer_without_a_fused_step_is_refused(tmp_path, tiny_model):
    from sweep.xtuner.render import fused_optimizer

    assert fused_optimizer({"type": "torch.optim.AdamW", "lr": 1e-3, "foreach": True}, "b.py") == {
        "type": "torch.optim.AdamW", "lr": 1e-3, "fused": True}  # fmt: skip
    with pytest.raises(SpecError, match=r"optim_wrapper.optimizer.type = 'torch.optim.RMSprop'\) has no fused step"):
        fused_optimizer({"type": "torch.optim.RMSprop"}, "b.py")
    with pytest.raises(SpecError, match="has no fused step"):
        fused_optimizer({"type": "bitsandbytes.optim.PagedAdamW8bit"}, "b.py")


def test_varlen_attention_without_flash_attn_is_refused(tmp_path, tiny_model):
    """XTuner falls back to attention across packed samples without a word when flash-attn 2 is missing."""
    from sweep.preflight import check

    config = tmp_path / "varlen.py"
    source = (ROOT / "benchmarks/bench_base.py").read_text()
    config.write_text(source + "\nuse_varlen_attn = True\n")
    spec = load_spec(write_spec(tmp_path, tiny_model, base_config=f"base_config: {config}"))
    with pytest.raises(SpecError, match="use_varlen_attn is True, but flash-attn 2 is not installed"):
        check(spec)


def test_mmengine_asks_for_mmcv_once_per_process_not_once_per_module():
    """Wrapping a model walks every module and asked for mmcv-full at each (a failed import over sys.path each time)."""
    from mmengine.model.utils import revert_sync_batchnorm

    from sweep.training import patches

    patches.prepare_process()
    import mmengine.model.utils as model_utils

    probe = model_utils.mmcv_full_available
    probe.cache_clear()
    revert_sync_batchnorm(torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(2, 2)) for _ in range(50)]))
    assert probe.cache_info().misses == 1 and probe.cache_info().hits >= 100
    assert probe() is False  # mmcv-full is not installed: the same answer as mmengine's own probe


@pytest.mark.e2e
def test_a_profiled_set_up_is_written_beside_the_trial_and_changes_nothing(tmp_path, tiny_model, plain, monkeypatch):
    import pstats

    from sweep.trial import protocol

    monkeypatch.setenv(protocol.PROFILE_SETUP_ENV, "1")
    profiled = _train_losses(tmp_path, tiny_model, "off")
    assert profiled == plain
    (profile,) = tmp_path.rglob(f"trial_0000/{protocol.SETUP_PROFILE}")
    assert "Ordered by: cumulative time" in profile.read_text()
    functions = {name for _, _, name in pstats.Stats(str(profile.with_suffix(".prof"))).stats}
    assert {"from_cfg", "get_peft_model", "build_dataloader"} <= functions, "the runner, LoRA and the data loaders"
    assert "run_iter" not in functions, "the profile ends before the first training step"
