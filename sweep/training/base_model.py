"""One base model per training process, shared by the trials a resident worker trains one after another.

XTuner builds the base model in ``SupervisedFinetune.build_llm_from_cfg`` and injects LoRA into it in
place. The cache returns the model it built for the same llm config; after a job the LoRA layers,
gradient checkpointing and the input-grad hooks are taken off again, so the next trial starts from the
model a fresh process would load. Loading draws no random numbers (it runs under ``fork_rng``), so a
trial's LoRA initialisation is the same either way.
"""

from __future__ import annotations

from typing import Any


class BaseModelCache:
    """The base model this process built, by its XTuner llm config, and whether the current job reused it."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.reused = False

    def install(self) -> None:
        """Route XTuner's model building through the cache (once per process)."""
        import torch
        from xtuner.model.sft import SupervisedFinetune

        original = SupervisedFinetune.build_llm_from_cfg
        cache = self

        def build_llm_from_cfg(self, llm_cfg, use_varlen_attn, max_position_embeddings):
            key = repr((llm_cfg, use_varlen_attn, max_position_embeddings))
            if key in cache.models:
                cache.reused = True
                return cache.models[key]
            cache.models.clear()  # another model: the old one goes (one base model per worker)
            with torch.random.fork_rng():  # loading draws no random numbers: LoRA's init is the same either way
                llm = original(self, llm_cfg, use_varlen_attn, max_position_embeddings)
            cache.models[key] = llm
            return llm

        SupervisedFinetune.build_llm_from_cfg = build_llm_from_cfg

    def job_started(self) -> None:
        self.reused = False

    def job_ended(self) -> bool:
        """Give the kept model back clean; returns whether one stays kept for the next job."""
        try:
            for llm in list(self.models.values()):
                if not strip_training_state(llm):
                    self.models.clear()  # no LoRA in it: the job trained the base weights themselves
        except Exception:  # noqa: BLE001 - a model that cannot be cleaned is not reused
            self.models.clear()
        return bool(self.models)


CACHE = BaseModelCache()


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
