"""GPU slots with a fake device list (CI has no GPU): packing by memory, whole GPUs for multi-GPU trials."""

from __future__ import annotations

import threading
import time

import pytest

from sweep.trial.placement import HEADROOM, LEAN_CALIBRATION, GpuSlots, MemoryModel, ModelShape, visible_gpus

H100 = 81559.0  # MB, as nvidia-smi reports an H100 80GB
QWEN2_1_5B = ModelShape(weights_mb=2944.0, hidden=1536, layers=28, vocab=151936)


def test_trials_spread_then_stack_until_memory_is_full():
    slots = GpuSlots({0: H100, 1: H100})
    need = 20_000.0
    assert slots.capacity(need) == 2 * int(H100 * HEADROOM // need)  # 3 per GPU
    got = [slots.acquire(need) for _ in range(6)]
    assert [g[0] for g in got] == [0, 1, 0, 1, 0, 1], "the emptiest GPU first"
    with pytest.raises(TimeoutError):
        slots.acquire(need, timeout=0.2)  # a 7th does not fit anywhere
    slots.release([1], need)
    assert slots.acquire(need, timeout=0.2) == [1]


def test_trials_per_gpu_caps_the_count():
    slots = GpuSlots({0: H100, 1: H100}, per_gpu=2)
    assert slots.capacity(1000.0) == 4
    for _ in range(4):
        slots.acquire(1000.0)
    with pytest.raises(TimeoutError):
        slots.acquire(1000.0, timeout=0.1)


def test_a_multi_gpu_trial_takes_whole_idle_gpus():
    slots = GpuSlots({0: H100, 1: H100, 2: H100, 3: H100})
    assert slots.acquire(10_000.0) == [0]
    assert slots.acquire(30_000.0, n=2) == [1, 2], "GPU 0 is shared already: not part of a DeepSpeed pair"
    with pytest.raises(TimeoutError):
        slots.acquire(30_000.0, n=2, timeout=0.1)  # only GPU 3 is idle
    slots.release([1, 2], 30_000.0)
    assert slots.acquire(30_000.0, n=2, timeout=0.1) == [1, 2]
    with pytest.raises(ValueError, match="only 4 GPU"):
        slots.acquire(1.0, n=5)


def test_concurrent_trials_never_overfill_a_gpu():
    slots = GpuSlots({0: 40_000.0, 1: 40_000.0}, per_gpu=3)
    need = 11_000.0  # 3 fit by memory (33 GB of 36.8 usable), capped at 3 anyway
    live = {0: 0, 1: 0}
    worst = {0: 0, 1: 0}
    lock = threading.Lock()

    def trial() -> None:
        (gpu,) = slots.acquire(need, timeout=30)
        with lock:
            live[gpu] += 1
            worst[gpu] = max(worst[gpu], live[gpu])
        time.sleep(0.05)
        with lock:
            live[gpu] -= 1
        slots.release([gpu], need)

    threads = [threading.Thread(target=trial) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(worst.values()) <= 3 and min(worst.values()) >= 2, worst
    assert slots.used == {0: 0.0, 1: 0.0} and slots.count == {0: 0, 1: 0}


def test_memory_estimate_matches_measured_peaks():
    """Peaks of XTuner LoRA trials of the Qwen2-1.5B shape, 2048 tokens (docs/benchmarks.md)."""
    memory = MemoryModel(QWEN2_1_5B)
    # checkpointing off, allocator peaks (max_memory_reserved) on an H200, batch 1 to 4
    for batch, peak in ((1, 22_134), (2, 32_802), (3, 47_922), (4, 61_514)):
        assert memory.estimate(batch, 2048, checkpointing=False) == pytest.approx(peak, rel=0.15), batch
    # checkpointing on, the team's H100 baseline (live tensors; the allocator holds a little more)
    for batch, allocated in ((1, 11_200), (4, 25_500)):
        assert allocated < memory.estimate(batch, 2048) < allocated * 1.3, batch


def test_a_lean_trial_is_planned_by_the_peaks_measured_with_the_lean_kernels():
    """Liger's kernels and 16-bit LoRA inputs keep no fp32 copies for the backward: the H100 benchmark's 12 trials
    (docs/benchmarks.md, 2026-12-07: fused loss, checkpointing off, reserved peaks by batch size, LoRA r 8/16/64)
    are all covered by the lean plan, which is far below the default's, so three of them start at once on 75 GB."""
    lean, default = MemoryModel(QWEN2_1_5B, fused_loss=True, lean=True), MemoryModel(QWEN2_1_5B, fused_loss=True)
    peaks = {1: (11_562, 12_362, 15_310), 2: (17_062, 16_884, 17_884), 3: (23_580, 24_186, 23_322),
             4: (30_838, 29_902, 29_724)}  # fmt: skip
    for batch, measured in peaks.items():
        plan = lean.estimate(batch, 2048, checkpointing=False)
        assert max(measured) < plan < 1.4 * max(measured), (batch, plan)
        assert plan < 0.75 * default.estimate(batch, 2048, checkpointing=False), batch
    first = [lean.estimate(b, 2048, checkpointing=False) for b in (4, 1, 2)]  # the benchmark's first trials
    assert sum(first) < 0.92 * H100
    lean.observe(4, 2048, False, peak_mb=40_000.0, key=0)
    lean.forget(0)
    assert lean.calibration == LEAN_CALIBRATION, "forgetting every peak returns to the lean default"


def test_measured_peaks_recalibrate_the_estimate_and_the_packing():
    memory = MemoryModel(QWEN2_1_5B)
    slots = GpuSlots({0: H100})
    before = memory.estimate(1, 2048)
    memory.observe(1, 2048, True, peak_mb=2 * before)  # a trial needed twice what was planned
    after = memory.estimate(1, 2048)
    assert after > 1.9 * before
    assert slots.capacity(after) < slots.capacity(before)
    memory.observe(1, 2048, True, peak_mb=before / 2)  # the largest ratio seen decides, not the latest
    assert memory.estimate(1, 2048) == after
    memory.out_of_memory()
    assert memory.estimate(1, 2048) > 1.2 * after, "an OOM plans every later trial larger"


def test_a_smaller_model_than_the_fit_packs_tighter_once_measured():
    memory = MemoryModel(ModelShape(weights_mb=500.0, hidden=896, layers=24, vocab=151936))
    planned = memory.estimate(1, 1024)
    memory.observe(1, 1024, True, peak_mb=(planned - 600) / 2)  # it needed half the plan
    assert memory.estimate(1, 1024) < 0.6 * planned


def test_model_shape_from_a_model_folder(tiny_model):
    shape = ModelShape.from_dir(tiny_model)
    assert shape.hidden > 0 and shape.layers == 4 and shape.vocab > 0 and shape.weights_mb > 0
    assert ModelShape.from_dir(tiny_model, quantize=True).weights_mb < shape.weights_mb


def test_asking_for_gpus_that_are_not_there():
    with pytest.raises(ValueError, match="no GPU"):
        visible_gpus([7])


def test_a_fused_loss_plans_without_the_logits_and_can_turn_checkpointing_off():
    """The logits are most of a LoRA step's activations at a 150k vocabulary: without them, activation checkpointing
    (speed.activation_checkpointing: auto) can go off where it otherwise had to stay on."""
    from types import SimpleNamespace

    from sweep.trial.run import _checkpointing

    plain, fused = MemoryModel(QWEN2_1_5B), MemoryModel(QWEN2_1_5B, fused_loss=True)
    assert fused.estimate(1, 2048, checkpointing=False) == plain.estimate(1, 2048, checkpointing=False), "one chunk"
    assert fused.estimate(8, 2048, checkpointing=False) < 0.8 * plain.estimate(8, 2048, checkpointing=False)
    gpu = {0: 0.9 * plain.estimate(8, 2048, checkpointing=False) / HEADROOM}  # fits only without the logits
    speed = SimpleNamespace(activation_checkpointing="auto")
    for memory, on in ((plain, True), (fused, False)):
        ctx = SimpleNamespace(spec=SimpleNamespace(speed=speed), slots=GpuSlots(gpu), memory=memory)
        assert _checkpointing(ctx, 8, 2048) is on


def test_cpu_trials_count_the_cpus_this_process_may_use():
    """A sweep pinned to one CPU (taskset, a scheduler's binding) plans one thread a trial, not the machine's count."""
    import subprocess
    import sys

    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " \
        "from sweep.trial.placement import usable_cpus; print(usable_cpus())"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"  # what `sweep run` plans with: tests/trial/test_pool.py checks the threads it asks for


def test_peaks_of_two_sizes_plan_by_a_line_that_covers_each():
    """Allocated peaks of the 12-trial benchmark on an H100 (2026-12-06, docs/benchmarks.md), batch 1 to 4, 2048
    tokens, checkpointing off: the largest ratio planned batch 1 a third over its peak, the line within 10 %."""
    peaks = {1: 11_334, 2: 18_623, 3: 26_017, 4: 33_429}
    memory = MemoryModel(QWEN2_1_5B, fused_loss=True)
    memory.observe(4, 2048, False, peaks[4])
    by_ratio = memory.estimate(1, 2048, checkpointing=False)  # one size measured: the ratio still plans
    assert by_ratio > 1.25 * peaks[1]
    for batch in (1, 2, 3):
        memory.observe(batch, 2048, False, peaks[batch])
    for batch, peak in peaks.items():
        assert peak < memory.estimate(batch, 2048, checkpointing=False) < 1.1 * peak + 600, batch
    assert memory.estimate(8, 2048, checkpointing=False) > 2 * peaks[4] - peaks[1], "a larger trial, linearly"
    # below the measured sizes the line (negative intercept) would plan less than the weights: the smallest ratio holds
    short = memory.formula(1, 128, checkpointing=False)
    assert memory.estimate(1, 128, checkpointing=False) >= 600 + short * min(p / memory.formula(b, 2048, False)
                                                                            for b, p in peaks.items()) * 1.05  # fmt: skip
    assert memory.estimate(1, 128, checkpointing=False) > QWEN2_1_5B.weights_mb
    ratio = memory.calibration
    memory.out_of_memory()  # one ran out beside others: the cautious ratio, raised, plans from now on
    assert memory.estimate(1, 2048, checkpointing=False) == pytest.approx(
        600 + memory.formula(1, 2048, checkpointing=False) * 1.25 * ratio
    )


def test_trials_of_one_size_keep_the_ratio():
    memory = MemoryModel(QWEN2_1_5B)
    memory.observe(2, 2048, True, 20_000)
    memory.observe(2, 2048, True, 21_000)  # the same formula twice: no line through one x
    assert memory.estimate(2, 2048) == pytest.approx(600 + 21_000 * 1.05)


def test_estimates_beside_observations_from_other_threads():
    """Optuna's trial threads estimate while finished trials observe: the line must see the peaks whole (without the
    lock, `zip(strict=True)` met a list that grew between its two passes)."""
    import sys
    import threading

    memory = MemoryModel(QWEN2_1_5B)
    errors: list[BaseException] = []
    done = threading.Event()

    def estimating() -> None:
        while not done.is_set():
            try:
                memory.estimate(2, 2048)
            except BaseException as err:  # noqa: BLE001 - collected for the assertion
                errors.append(err)
                return

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    reader = threading.Thread(target=estimating)
    try:
        reader.start()
        for n in range(3000):
            memory.observe(1 + n % 4, 2048, True, 10_000.0 + 3_000 * (n % 4))
    finally:
        done.set()
        reader.join()
        sys.setswitchinterval(old)
    assert errors == []


def test_a_waiting_trial_is_placed_by_what_finished_trials_taught():
    """A batch-4 trial that waits for room is planned again when a slot frees, by the peaks measured meanwhile."""
    memory = MemoryModel(QWEN2_1_5B)
    slots = GpuSlots({0: H100})
    small, other = memory.estimate(1, 2048, False), memory.estimate(2, 2048, False)
    running = slots.acquire(small)
    neighbour = slots.acquire(other)
    guess = memory.estimate(4, 2048, False)
    assert small + other + guess > H100 * HEADROOM, "it waits"
    placed: list[tuple[list[int], float]] = []
    waiter = threading.Thread(
        target=lambda: placed.append(slots.acquire_estimated(lambda: memory.estimate(4, 2048, False), timeout=30))
    )
    waiter.start()
    time.sleep(0.3)
    assert not placed
    # the neighbour ends: its peak and one more, of the H100 run of 2026-12-07 (cut-cross-entropy, checkpointing off)
    memory.observe(1, 2048, False, 11_664.0)
    memory.observe(2, 2048, False, 19_404.0)
    slots.release(neighbour, other)
    waiter.join(timeout=30)
    (gpus, reserved), taught = placed[0], memory.estimate(4, 2048, False)
    assert gpus == [0] and reserved == taught < 0.8 * guess, (reserved, guess)
    assert small + guess > H100 * HEADROOM > small + reserved, "the old guess would not have fitted beside it"
    slots.release(gpus, reserved)
    slots.release(running, small)
    assert slots.used == {0: 0.0} and slots.count == {0: 0}, "what was reserved is what is given back"


def test_a_failed_trials_early_peak_is_forgotten():
    """A trial's peak read after its first iterations is replaced at its end, or dropped if it failed: a run that
    went out of memory or crashed says nothing about what its size needs."""
    model = MemoryModel(QWEN2_1_5B)
    first = model.calibration
    model.observe(4, 2048, False, 30_000.0, key=1)
    model.observe(1, 2048, False, 11_000.0, key=2)
    model.observe(4, 2048, False, 31_000.0, key=1)  # trial 1's end replaces its early reading
    assert [p for _, p in model.measured] == [31_000.0, 11_000.0]
    model.forget(1)
    assert [p for _, p in model.measured] == [11_000.0]
    assert model.calibration == pytest.approx(11_000.0 / model.formula(1, 2048, False) * 1.05)
    model.forget(2)
    model.forget(3)  # never observed: nothing to drop
    assert model.measured == [] and model.calibration == first


def _waiter(slots: GpuSlots, need: float, order: int, placed: list[int], stop: threading.Event) -> threading.Thread:
    """A trial thread as `run._acquire` runs it: asks again each second until placed, withdraws when stopped."""

    def run() -> None:
        while not stop.is_set():
            try:
                slots.acquire_estimated(lambda: need, timeout=0.05, order=order)
            except TimeoutError:
                continue
            placed.append(order)
            return
        slots.withdraw(order)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_earliest_waiting_trial_is_not_starved_by_later_smaller_ones():
    """Two trials fill a GPU; the large trial 0 waits; a small later trial would fit now, but only in the room that
    trial 0 waits for: it waits too, and when a slot frees, trial 0 starts first. Without the order, small trials
    kept starting one after another and the largest ran last, alone (H100, docs/benchmarks.md)."""
    slots = GpuSlots({0: 100.0 / HEADROOM})  # 100 MB to plan
    a, _ = slots.acquire_estimated(lambda: 40.0, order=1)
    b, _ = slots.acquire_estimated(lambda: 40.0, order=2)
    placed: list[int] = []
    stop = threading.Event()
    head = _waiter(slots, 50.0, 0, placed, stop)
    _until(lambda: 0 in slots._waiting)
    later = _waiter(slots, 15.0, 3, placed, stop)
    time.sleep(0.3)  # many of its polls: it fits (80 + 15 of 100), but trial 0 would not fit beside it
    assert placed == []
    slots.release(a, 40.0)
    _until(lambda: placed == [0])
    assert placed == [0], "the earliest waiting trial takes the freed slot"
    time.sleep(0.2)
    assert placed == [0], "90 MB in use: the later trial (15) does not fit yet"
    slots.release(b, 40.0)
    _until(lambda: placed == [0, 3])
    assert placed == [0, 3]
    stop.set()
    head.join(timeout=5)
    later.join(timeout=5)


def test_a_later_trial_starts_beside_a_waiting_one_where_both_fit_and_a_withdrawn_one_holds_nothing():
    slots = GpuSlots({0: 100.0 / HEADROOM})
    slots.acquire_estimated(lambda: 60.0, order=1)
    placed: list[int] = []
    stop, head_stop = threading.Event(), threading.Event()
    head = _waiter(slots, 50.0, 0, placed, head_stop)  # 60 + 50 > 100: waits
    _until(lambda: 0 in slots._waiting)
    _waiter(slots, 30.0, 2, placed, stop)  # 60 + 30 fits, and 50 would not fit either way: it still waits
    time.sleep(0.2)
    assert placed == []
    head_stop.set()  # trial 0 gives up (the sweep stops it): trial 2 is no longer held for it
    head.join(timeout=5)
    _until(lambda: placed == [2])
    assert placed == [2] and 0 not in slots._waiting
    stop.set()


@pytest.mark.parametrize(("setting", "checkpointing"), [("auto", False), ("on", True), ("off", False)])
def test_the_sweep_plans_its_workers_by_the_first_point_as_it_will_run(
    tmp_path, tiny_model, monkeypatch, setting, checkpointing
):
    """`speed.activation_checkpointing: auto` turns checkpointing off where a trial fits without it; the count of
    trials at once (and of workers started ahead) is planned by that trial, not by one that checkpoints. Planned with
    checkpointing, a batch-1 first point started 7 workers on an H100 where 4 trials fit (docs/benchmarks.md)."""
    from sweep import speed
    from sweep.knobs import base_values, trial_values
    from sweep.search import first_point
    from sweep.spec import load_spec
    from sweep.study import RunOptions, _gpu_plan
    from sweep.xtuner.config import load_base_config
    from tests.conftest import write_spec

    spec = load_spec(write_spec(tmp_path, tiny_model, speed=f"speed: {{activation_checkpointing: {setting}}}",
                                fixed="fixed: {max_length: 4096, batch_size: 8, max_epochs: 1}"))  # fmt: skip
    values = trial_values(spec, first_point(spec), base_values(load_base_config(spec.base_config)))
    monkeypatch.setattr(speed, "installed", lambda module: False)  # plain kernels and loss, as `probe` plans them
    probe = MemoryModel(ModelShape.from_dir(tiny_model))
    with_it, without = probe.estimate(8, 4096, True), probe.estimate(8, 4096, False)
    assert without > 1.5 * with_it
    gpu_mb = 2.5 * without / HEADROOM  # two trials without checkpointing fit, more with it
    options = RunOptions(storage="sqlite:///unused.db", tracking_uri="sqlite:///unused-mlflow.db", work_dir=tmp_path)
    slots, _, n_jobs = _gpu_plan(spec, options, {0: gpu_mb}, values)
    assert n_jobs == slots.capacity(with_it if checkpointing else without)
    assert n_jobs == 2 if not checkpointing else n_jobs > 2


def test_a_gpu_no_trial_holds_is_empty_whatever_float_remainders_were_left():
    """Adding and taking back float MB leaves remainders (0.1 + 0.2 - 0.2 != 0.1): on an emptied GPU they would block a
    trial that must run alone, which needs all of it, and the earliest-first rule then every trial behind it."""
    slots = GpuSlots({0: H100, 1: H100})
    a = slots.acquire(0.1)
    slots._waiting[0] = (slots.one_gpu_mb, 1)  # an alone trial waits: later trials are placed to leave it a GPU
    with slots._cond:
        assert slots._choose(1, 0.2, order=5) == a, "beside the 0.1 MB trial: the other GPU stays whole"
    assert slots.used == {0: 0.1, 1: 0.0}, "the places were tried on copies"
    slots.withdraw(0)
    slots.used[0] = 0.1 + 0.2 - 0.2  # 0.10000000000000003: what adding and taking back left before
    slots.release(a, 0.1)
    assert slots.used[0] == 0.0 and slots.count[0] == 0
    assert slots.acquire(slots.one_gpu_mb, timeout=0.5) == [0], "the emptied GPU takes a trial that needs all of it"


def test_a_later_trial_goes_where_the_earliest_waiting_one_still_fits():
    """Not only the emptiest GPU is tried: a later trial that would take the room the earliest waiting trial needs on
    one GPU starts on another GPU instead of waiting."""
    slots = GpuSlots({0: 100.0 / HEADROOM, 1: 100.0 / HEADROOM})
    slots.acquire(60.0)  # GPU 0
    slots.acquire(70.0)  # GPU 1
    slots._waiting[0] = (31.0, 1)  # trial 0 waits for 31 MB: it fits on GPU 0 only (60 + 31)
    with slots._cond:
        assert slots._choose(1, 25.0, order=5) == [1], "GPU 0 is emptier, but 25 there would leave 15 for 31"
        assert slots._choose(1, 35.0, order=5) is None, "35 fits only on GPU 0, where trial 0 needs the room"
        assert slots._choose(1, 35.0, order=None) is None, "an unordered trial counts as the last"


def test_a_waiting_trial_that_fails_gives_up_its_place(monkeypatch):
    """`run._acquire` withdraws a trial whose wait ends in an error (here its estimate raises), so the trials behind it
    are not held for it."""
    from sweep.trial import run

    slots = GpuSlots({0: 100.0 / HEADROOM})
    slots.acquire_estimated(lambda: 80.0, order=1)
    calls = iter(range(1000))
    failed: list[BaseException] = []

    def estimate() -> float:
        if next(calls) > 3:
            raise RuntimeError("the memory model broke")
        return 50.0

    def head() -> None:
        try:
            run._acquire(slots, estimate, 1, 0)
        except RuntimeError as err:
            failed.append(err)

    thread = threading.Thread(target=head, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert failed and 0 not in slots._waiting
    assert slots.acquire_estimated(lambda: 15.0, timeout=0.5, order=2)[0] == [0]
