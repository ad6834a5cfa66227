"""perf/memory_mb on a GPU is the step's peak, not what is left after mmengine's logger reset the peak."""

from types import SimpleNamespace

import pytest
import torch
from mmengine.hooks import LoggerHook
from mmengine.logging import MessageHub
from mmengine.runner import LogProcessor
from mmengine.runner.priority import get_priority

from sweep.training.memory import PEAK_KEY, StepMemoryHook


class _FakeAllocator:
    """torch.cuda's peak counter, as the allocator keeps it: the largest allocation since the last reset."""

    def __init__(self) -> None:
        self.peak = self.now = 0

    def step(self, peak_mb: int, left_mb: int) -> None:
        self.peak, self.now = max(self.peak, peak_mb * 2**20), left_mb * 2**20

    def max_memory_allocated(self, device=None) -> int:
        return self.peak

    def reset_peak_memory_stats(self, device=None) -> None:
        self.peak = self.now


@pytest.fixture
def gpu(monkeypatch) -> _FakeAllocator:
    """A machine that says it has a GPU, whose torch.cuda peak counters are a ``_FakeAllocator``'s."""
    fake = _FakeAllocator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake.max_memory_allocated)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset_peak_memory_stats)
    return fake


def test_the_step_peak_is_read_before_the_logger_resets_it(gpu):
    runner = SimpleNamespace(message_hub=MessageHub.get_instance("test-step-memory"), model=torch.nn.Linear(1, 1))

    gpu.step(peak_mb=50_000, left_mb=4_000)  # a training step: activations allocated, then freed
    assert get_priority(StepMemoryHook.priority) < get_priority(LoggerHook.priority), "it must run first"
    StepMemoryHook().after_train_iter(runner, 0)
    LogProcessor()._get_max_memory(runner)  # what LoggerHook does when it logs "memory": the peak is reset
    assert gpu.max_memory_allocated() / 2**20 == 4_000, "mmengine reset the peak (what SweepHook used to read)"
    assert runner.message_hub.get_info(PEAK_KEY) == 50_000


def test_a_validation_point_is_not_the_next_steps_peak(gpu):
    """Validation (greedy answers, larger batches) runs after a step's peak was read: the next step starts afresh."""
    runner = SimpleNamespace(message_hub=MessageHub.get_instance("test-val-memory"), model=torch.nn.Linear(1, 1))
    hook = StepMemoryHook()
    for step, (peak, validation) in enumerate([(30_000, 90_000), (31_000, None)]):
        hook.before_train_iter(runner, step)
        gpu.step(peak_mb=peak, left_mb=4_000)
        hook.after_train_iter(runner, step)
        assert runner.message_hub.get_info(PEAK_KEY) == peak, f"step {step}"
        if validation:
            gpu.step(peak_mb=validation, left_mb=4_000)  # SweepHook's validation point after the step


def test_every_trial_config_has_the_memory_hook(tmp_path, tiny_model):
    from sweep.knobs import base_values, trial_values
    from sweep.spec import load_spec
    from sweep.trial.protocol import MEMORY_HOOK_TYPE, TrialFiles
    from sweep.xtuner.config import load_base_config, load_config
    from sweep.xtuner.render import Device, render
    from tests.conftest import write_spec

    spec = load_spec(write_spec(tmp_path, tiny_model))
    base = load_base_config(spec.base_config)
    values = trial_values(spec, {"lr": 1e-4, "lora_r": 8, "mix_ratio": 0.0}, base_values(base))
    files = TrialFiles(tmp_path / "t.jsonl", tmp_path / "v.jsonl", tmp_path, 10)
    (tmp_path / "config.py").write_text(render(base, spec, values, files, Device(cuda=False)))
    hooks = [h["type"] for h in load_config(tmp_path / "config.py").custom_hooks]
    assert MEMORY_HOOK_TYPE in hooks
