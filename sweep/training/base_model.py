"""One base model per training process, shared by the trials a resident worker trains one after another.

XTuner builds the base model in ``SupervisedFinetune.build_llm_from_cfg`` and injects LoRA into it in
place. The cache returns the model it built for the same llm config; after a job the LoRA layers,
gradient checkpointing and the input-grad hooks are taken off again, so the next trial starts from the
model a fresh process would load. Loading draws no random numbers (it runs under ``fork_rng``), so a
trial's LoRA initialisation is the same either way.

A worker that trains several jobs at once (``protocol.JOBS_AT_ONCE_ENV``) never injects LoRA into the
kept model: each job gets a ``cotrain.shared_copy`` of it (its own modules over the same tensors). PEFT's
upcast of 16-bit weights to fp32 (``prepare_model_for_kbit_training``) is then done once, on the kept
model, and skipped for the copies: run again while other trials train, it would swap the shared weights'
dtype under them (and double their memory) each time a trial starts.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from sweep.trial import protocol


class BaseModelCache:
    """The base model this process built, by its XTuner llm config, and whether the current job reused it."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.shared = int(os.environ.get(protocol.JOBS_AT_ONCE_ENV, "1") or 1) > 1
        self._job = threading.local()  # per job thread: whether its model was reused
        self._lock = threading.Lock()

    @property
    def reused(self) -> bool:
        """Whether the current thread's job got the kept model."""
        return getattr(self._job, "reused", False)

    @reused.setter
    def reused(self, value: bool) -> None:
        self._job.reused = value

    def install(self) -> None:
        """Route XTuner's model building through the cache (once per process)."""
        import torch
        from xtuner.model import sft
        from xtuner.model.sft import SupervisedFinetune

        from sweep.training import cotrain

        original = SupervisedFinetune.build_llm_from_cfg
        cache = self

        def build_llm_from_cfg(self, llm_cfg, use_varlen_attn, max_position_embeddings):
            key = repr((llm_cfg, use_varlen_attn, max_position_embeddings))
            with cache._lock:
                llm = cache.models.get(key)
                cache.reused = llm is not None
                if llm is None:
                    if cache.shared and cache.models:
                        raise RuntimeError("this worker shares one base model between its jobs; this job's llm "
                                           f"config differs from it: {llm_cfg!r}")  # fmt: skip
                    cache.models.clear()  # another model: the old one goes (one base model per worker)
                    with torch.random.fork_rng():  # loading draws no random numbers: LoRA's init is the same either way
                        llm = original(self, llm_cfg, use_varlen_attn, max_position_embeddings)
                    if cache.shared:
                        upcast_like_peft(llm)
                    cache.models[key] = llm
            return cotrain.shared_copy(llm) if cache.shared else llm

        SupervisedFinetune.build_llm_from_cfg = build_llm_from_cfg
        if self.shared:
            prepare = sft.prepare_model_for_kbit_training

            def prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, **kwargs):
                if cotrain.shared_from(model) is None:
                    return prepare(model, use_gradient_checkpointing, **kwargs)
                return prepare_shared_copy(model, use_gradient_checkpointing, **kwargs)

            sft.prepare_model_for_kbit_training = prepare_model_for_kbit_training

    def job_started(self) -> None:
        self.reused = False

    def job_ended(self) -> bool:
        """Give the kept model back clean; returns whether one stays kept for the next job."""
        if self.shared:
            return bool(self.models)  # the job's LoRA layers were in its own copy: the kept model never had any
        try:
            for llm in list(self.models.values()):
                if not strip_training_state(llm):
                    self.models.clear()  # no LoRA in it: the job trained the base weights themselves
        except Exception:  # noqa: BLE001 - a model that cannot be cleaned is not reused
            self.models.clear()
        return bool(self.models)


CACHE = BaseModelCache()


def upcast_like_peft(llm: Any) -> None:
    """What ``prepare_model_for_kbit_training`` does to a model's dtypes: every 16-bit tensor but nf4's to fp32."""
    import torch

    for param in llm.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)


def prepare_shared_copy(model: Any, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs=None,
                        **_: Any) -> Any:  # fmt: skip
    """``prepare_model_for_kbit_training`` for a shared copy, minus the upcast (done once on the kept model)."""
    model.requires_grad_(False)
    quantized = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    if quantized and use_gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {})
    return model


def strip_training_state(llm: Any) -> bool:
    """Take off what a trial added to the shared base model: LoRA layers, checkpointing, grad hooks.

    Returns whether the base model can serve another trial: not when no LoRA layers were found (the
    base weights were trained) or when the LoRA initialisation changed the base weights.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sweep.training import fused_loss

    fused_loss.uninstall(llm)  # a trial that crashed before after_train
    adapters = [(n, m) for n, m in llm.named_modules() if n and isinstance(m, BaseTunerLayer)]
    configs = getattr(llm, "peft_config", {}) or {}
    if any(getattr(c, "init_lora_weights", True) not in (True, False, "gaussian") for c in configs.values()):
        return False  # PiSSA, OLoRA, LoftQ, ...: the initialisation rewrote the base weights themselves
    for name, module in adapters:
        parent, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent) if parent else llm, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded", "_require_grads_hook"):
        if attr in vars(llm):
            delattr(llm, attr)
    if getattr(llm, "is_gradient_checkpointing", False):
        llm.gradient_checkpointing_disable()
    hooks = llm.get_input_embeddings()._forward_hooks
    for key, hook in list(hooks.items()):
        if getattr(hook, "__name__", "").startswith("make_inputs_require_grad"):
            del hooks[key]
    llm.requires_grad_(False)
    llm.zero_grad(set_to_none=True)
    return bool(adapters)
