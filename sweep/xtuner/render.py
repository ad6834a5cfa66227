"""Render one trial's XTuner config from the user's base config, as a file of literal values only.

The base config (a config-zoo name or the user's own file) is loaded with mmengine, the fields a
trial owns are replaced (model path, template, data, swept knobs, validation, checkpointing) and
the result is written back as ``name = <literal>`` lines. Objects become dotted import paths,
which mmengine's registries resolve. Every right-hand side is checked with ``ast.literal_eval``
before the file is written, so no value from a spec or a data file can ever run as code.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweep import knobs, speed
from sweep.spec import GenerationSpec, Spec, SpecError
from sweep.trial import protocol
from sweep.trial.protocol import TrialFiles
from sweep.xtuner import llava
from sweep.xtuner.config import prompt_template
from sweep.xtuner.literal import to_source

BASELINE_FORMAT = "xtuner-sweep baseline 2"  # change it when what the step-0 point holds changes

VAL_BATCH_SIZE = 4
NEVER = 10**12  # an iteration no run reaches: the loop's own validation schedule is switched off


@dataclass(frozen=True)
class Device:
    """Where a trial trains: decides fp32/OptimWrapper on the CPU vs the base config's AMP on GPUs."""

    cuda: bool
    n_gpus: int = 1


def render(
    base: dict[str, Any],
    spec: Spec,
    values: dict[str, Any],
    files: TrialFiles,
    device: Device,
    activation_checkpointing: bool | None = None,
) -> str:
    """The source of one trial's config. ``base`` is left unchanged.

    ``activation_checkpointing`` None keeps the base config's choice (XTuner's default is on).
    """
    multimodal = llava.is_llava(base)
    if multimodal != spec.multimodal:
        raise SpecError(
            f"base_config {spec.base_config}: is a LLaVA config (a visual_encoder beside its LLM); name the tower "
            "and the image folder: model.visual_encoder and data.images"
            if multimodal
            else f"model.visual_encoder: base_config {spec.base_config} is not a LLaVA config (no model.visual_encoder)"
        )
    if not isinstance(_get(base, "model", "llm_lora" if multimodal else "lora"), dict):
        raise SpecError(
            f"base_config {spec.base_config}: has no model.lora (it trains every weight: a full or DPO fine-tune); "
            "xtuner-sweep tunes LoRA/QLoRA adapters: start from a *_lora_* or *_qlora_* config"
        )
    cfg = copy.deepcopy(base)
    if activation_checkpointing is not None:
        cfg["model"]["use_activation_checkpointing"] = bool(activation_checkpointing)
    template = prompt_template(spec.model.template)
    model_path = str(spec.model.path)
    old_path = _get(cfg, "model", "llm", "pretrained_model_name_or_path")

    # Model and tokenizer: every place the base config named its model now names the user's.
    _replace_values(cfg, "pretrained_model_name_or_path", old_path, model_path)
    _replace_values(cfg, "trust_remote_code", None, spec.model.trust_remote_code)  # XTuner's configs say True
    tokenizer = copy.deepcopy(cfg.get("tokenizer")) or {
        "type": "transformers.AutoTokenizer.from_pretrained",
        "pretrained_model_name_or_path": model_path,
        "trust_remote_code": spec.model.trust_remote_code,
        "padding_side": "right",
    }
    llm = cfg["model"]["llm"]
    if spec.model.quantize:
        llm.setdefault(
            "quantization_config",
            {
                "type": "transformers.BitsAndBytesConfig",
                "load_in_4bit": True,
                "load_in_8bit": False,
                "llm_int8_threshold": 6.0,
                "llm_int8_has_fp16_weight": False,
                "bnb_4bit_compute_dtype": "float16",
                "bnb_4bit_use_double_quant": True,
                "bnb_4bit_quant_type": "nf4",
            },
        )
    else:
        llm.pop("quantization_config", None)

    knobs.write(cfg, values)  # LoRA rank/alpha/dropout, batch size, learning rate, accumulation

    # Data: the trial's mixed training file and the study's validation file, in the spec's template.
    max_length = int(values["max_length"])
    old_ds = _get(cfg, "train_dataloader", "dataset") or {}
    pack = packs_rows(cfg)
    varlen = bool(cfg.get("use_varlen_attn", False))
    # XTuner packs each of map_num_proc shards on its own, so the packed rows depend on it: the base config's
    # value when it sets one (then a trial trains on the rows `xtuner train` would), else processes by data size
    n_proc = old_ds.get("map_num_proc") or max(1, min(os.cpu_count() or 1, files.n_train_rows // 2000))
    for name in [k for k, v in cfg.items() if v is not old_ds and v == old_ds]:
        del cfg[name]  # the base's own dataset, kept under a variable name: not what this trial trains on
    cfg["train_dataloader"]["dataset"] = _dataset(files.train, tokenizer, template, max_length, pack, varlen, n_proc)
    if multimodal:  # the loaders of pictures and their questions (sweep.xtuner.llava)
        llava.render_parts(cfg, spec, files, old_ds, tokenizer, template, max_length, int(values["batch_size"]),
                           VAL_BATCH_SIZE, n_proc, cpu=not device.cuda)  # fmt: skip
    if files.tokenized:  # XTuner's pipeline goes on from the tokens: filter, shuffle, pack
        cfg["train_dataloader"]["dataset"].update(
            do_dataset_tokenization=False, dataset_map_fn=None, template_map_fn=None
        )
    if spec.speed.data_workers:  # batches collated beside training while the GPU works
        cfg["train_dataloader"].update(num_workers=spec.speed.data_workers, persistent_workers=True)
    cfg["prompt_template"] = template
    cfg["max_length"] = max_length
    cfg["SYSTEM"] = spec.model.system

    if not multimodal:
        cfg["val_dataloader"] = _val_loader(files.val, tokenizer, template, max_length, keep_groups=bool(files.groups))
    cfg["val_evaluator"] = {"type": protocol.VAL_METRIC_TYPE}
    cfg["val_cfg"] = {"type": "mmengine.runner.ValLoop"}

    # Schedule: epochs (or iterations), and the base's LR schedule stretched to the new length.
    old_epochs = _get(cfg, "train_cfg", "max_epochs")
    old_iters = _get(cfg, "train_cfg", "max_iters")
    if values.get("max_iters"):
        _iteration_schedule(cfg, int(values["max_iters"]), old_epochs, old_iters)
    else:
        _epoch_schedule(cfg, int(values["max_epochs"]), old_epochs)
    optim = cfg["optim_wrapper"]

    if not device.cuda:
        for key in ("loss_scale", "dtype"):
            optim.pop(key, None)
        if spec.cpu_amp:  # the dtypes of a GPU's AMP: bf16 weights, bf16 autocast
            optim.update(type=protocol.CPU_AMP_WRAPPER_TYPE, dtype="bfloat16")
            llm["torch_dtype"] = "bfloat16"
        else:
            optim["type"] = "mmengine.optim.OptimWrapper"
            llm["torch_dtype"] = "float32"
        cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "gloo"

    if speed.fused_optimizer(spec, device):
        optim["optimizer"] = fused_optimizer(optim.get("optimizer") or {}, spec.base_config)

    amp = (optim.get("type"), optim.get("dtype"))  # validation's autocast: what the step-0 point depends on

    # Validation, streaming and best-checkpoint selection.
    objective = spec.objective
    rule = "less" if objective.primary_direction == "minimize" else "greater"
    hooks = [h for h in cfg.get("custom_hooks") or [] if "EvaluateChatHook" not in str(h.get("type"))]
    general_val = _val_loader(files.general_val, tokenizer, template, max_length) if files.general_val else None
    if general_val is not None and multimodal:
        ds = cfg["val_dataloader"]["dataset"]
        general_val = llava.val_loader(files.general_val, tokenizer, ds["image_processor"], template, max_length,
                                       ds["pad_image_to_square"], VAL_BATCH_SIZE)  # fmt: skip
    generation = _generation(spec, files, tokenizer, template)
    if generation is not None and multimodal:
        generation["llava"] = llava.generation_settings(cfg)
    # a LLaVA model's step 0 is also its tower and projector: they are in the key with the LLM
    parts = {k: v for k, v in cfg["model"].items() if k in ("visual_encoder", "pretrained_pth")} if multimodal else {}
    baseline = _baseline_path(spec, files, llm, amp, cfg["val_dataloader"], general_val, generation, *parts.items())
    settings = protocol.HookSettings(
        metric=objective.primary,
        rule=rule,
        eval_every=spec.eval_every,
        n_train_rows=files.n_train_rows,
        stream=str(files.stream),
        control=str(files.control),
        adapter_dir=str(files.adapter),
        generation=generation,
        general_val=general_val,
        weights=dict(objective.weights) if objective.weights else None,
        frozen_16bit=spec.speed.frozen_weights_16bit,
        baseline=str(baseline) if spec.speed.baseline_once else None,
        fused_loss=speed.fused_loss(spec, device),
        compile=spec.speed.compile,
        compile_dropout=spec.speed.compile_dropout,
        compile_exact_casts=spec.speed.compile_exact_casts,
        fused_kernels=speed.fused_kernels(spec, device),
        lora_input_16bit=speed.lora_input_16bit(spec, device),
        groups=list(files.groups) or None,
        keep=objective.keep,
    )
    hooks += [settings.as_config(), {"type": protocol.MEMORY_HOOK_TYPE}]
    cfg["custom_hooks"] = hooks
    default_hooks = cfg.setdefault("default_hooks", {})
    old_ckpt = default_hooks.get("checkpoint") or {}
    keep = spec.keep_checkpoints
    default_hooks["checkpoint"] = {
        "type": "mmengine.hooks.CheckpointHook",
        "by_epoch": False,
        "interval": int(old_ckpt.get("interval", 500)) if keep > 0 else -1,
        "max_keep_ckpts": keep if keep > 0 else -1,
        "save_last": keep > 0,
        "save_best": objective.primary,
        "rule": rule,
    }
    cfg["randomness"] = {"seed": spec.seed, "deterministic": False}
    # mmengine names a runner's logger, message hub and visualizer after it (config file name plus the second it was
    # built): two trials built in the same second by one worker (speed.trials_per_worker) would share them
    cfg["experiment_name"] = files.work_dir.name
    cfg["work_dir"] = str(files.work_dir)
    cfg["visualizer"] = None
    return to_source(cfg)


def _epoch_schedule(cfg: dict, epochs: int, old_epochs: int | None) -> None:
    cfg["train_cfg"] = {**cfg.get("train_cfg", {}), "max_epochs": epochs, "val_interval": NEVER, "val_begin": NEVER}
    cfg["train_cfg"].pop("max_iters", None)
    if old_epochs:
        for sched in cfg.get("param_scheduler") or []:
            if sched.get("by_epoch", True):
                for key in ("begin", "end"):
                    if isinstance(sched.get(key), (int, float)):
                        sched[key] = sched[key] * epochs / old_epochs


def _iteration_schedule(cfg: dict, iters: int, old_epochs: int | None, old_iters: int | None) -> None:
    """A fixed number of iterations; epoch-based scheduler ranges become iteration ranges of the same shape."""
    loop = {k: v for k, v in cfg.get("train_cfg", {}).items() if k not in ("max_epochs", "max_iters")}
    loop.setdefault("type", "xtuner.engine.runner.TrainLoop")
    cfg["train_cfg"] = {**loop, "max_iters": iters, "val_interval": NEVER, "val_begin": NEVER}
    for sched in cfg.get("param_scheduler") or []:
        by_epoch = sched.get("by_epoch", True)
        old = old_epochs if by_epoch else old_iters
        for key in ("begin", "end"):
            if isinstance(sched.get(key), (int, float)) and old:
                sched[key] = round(sched[key] * iters / old)
        sched["by_epoch"] = False
        sched.pop("convert_to_iter_based", None)


def _baseline_path(spec: Spec, files: TrialFiles, *what_it_depends_on: Any) -> Path:
    """Where the study keeps its untrained (step-0) validation point for trials that share this key.

    The key covers what that point is computed from: the base model's load settings and files, the
    optimizer wrapper (its autocast dtype), the validation loaders and generation settings (max_length, template and tokenizer among them), the
    study's data digest (the split's contents, which a study never lets change); LoRA's rank, dropout
    or learning rate do not change it.
    """
    digest = hashlib.sha256(f"{BASELINE_FORMAT}|{files.data_digest}|{what_it_depends_on!r}".encode())
    model_dir = Path(spec.model.path)
    for weight in sorted(model_dir.iterdir()) if model_dir.is_dir() else []:
        if weight.is_file():
            stat = weight.stat()
            digest.update(f"{weight.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return files.baseline(digest.hexdigest()[:20])


def _generation(spec: Spec, files: TrialFiles, tokenizer: dict, template: dict) -> dict | None:
    if not spec.generates:
        return None
    gen = spec.generation or GenerationSpec()
    return {
        "val_file": str(files.val),
        "score_answers": spec.scores_answers,
        "max_rows": gen.max_rows,
        "max_new_tokens": gen.max_new_tokens,
        "probes": [p if isinstance(p, str) else {"image": str(p.image), "question": p.question} for p in spec.probes],
        "template": template,
        "system": spec.model.system,
        "tokenizer": tokenizer,
    }


def fused_optimizer(optimizer: dict, base_config: Any) -> dict:
    """``speed.fused_optimizer``: the base config's optimizer with torch's fused step (``fused=True``).

    Same update rule, computed for all tensors in one kernel instead of a loop over them; only torch optimizers
    that take ``fused`` (Adam, AdamW, SGD, Adagrad) have it, and anything else is refused before a trial starts.
    """
    import importlib
    import inspect

    kind = optimizer.get("type")
    if isinstance(kind, str):
        module, _, name = kind.rpartition(".")
        try:
            kind = getattr(importlib.import_module(module or "torch.optim"), name)
        except (ImportError, AttributeError):
            kind = None
    if not (inspect.isclass(kind) and "fused" in inspect.signature(kind).parameters):
        raise SpecError(
            f"speed.fused_optimizer: the optimizer of {base_config} (optim_wrapper.optimizer.type = "
            f"{optimizer.get('type')!r}) has no fused step; torch's Adam, AdamW, SGD and Adagrad have one"
        )
    return {**{k: v for k, v in optimizer.items() if k != "foreach"}, "fused": True}


def _val_loader(path: Path, tokenizer: dict, template: dict, max_length: int, keep_groups: bool = False) -> dict:
    """Unpacked rows in a fixed order: every trial is scored on the same tokens.

    ``keep_groups`` keeps the rows' own columns beside their tokens (the same tokens), so that the hook reads each
    row's group from the very dataset the loss is taken on (``sweep.groups``).
    """
    dataset = _dataset(path, tokenizer, template, max_length, False, False, 1)
    if keep_groups:
        dataset["remove_unused_columns"] = False
    return {
        "batch_size": VAL_BATCH_SIZE,
        "num_workers": 0,
        "dataset": dataset,
        "sampler": {"type": "mmengine.dataset.DefaultSampler", "shuffle": False},
        "collate_fn": {"type": "xtuner.dataset.collate_fns.default_collate_fn", "use_varlen_attn": False},
    }


def _dataset(path: Path, tokenizer: dict, template: dict, max_length: int, pack: bool, varlen: bool, n_proc: int):
    return {
        "type": "xtuner.dataset.process_hf_dataset",
        "dataset": {"type": "datasets.load_dataset", "path": "json", "data_files": {"train": str(path)}},
        "tokenizer": tokenizer,
        "max_length": max_length,
        "dataset_map_fn": "xtuner.dataset.map_fns.openai_map_fn",
        "template_map_fn": {"type": "xtuner.dataset.map_fns.template_map_fn_factory", "template": template},
        "remove_unused_columns": True,
        "shuffle_before_pack": pack,
        "pack_to_max_length": pack,
        "use_varlen_attn": varlen,
        "map_num_proc": n_proc,
    }


def packs_rows(base_cfg: dict) -> bool:
    """Whether the base config packs its training rows into ``max_length`` sequences (XTuner's default), which every
    trial then trains on: every step has one shape."""
    return bool((_get(base_cfg, "train_dataloader", "dataset") or {}).get("pack_to_max_length", True))


def _get(cfg: dict, *path: str) -> Any:
    node: Any = cfg
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _replace_values(node: Any, key: str, old: Any, new: Any) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and (v == old or old is None):
                node[k] = new
            else:
                _replace_values(v, key, old, new)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _replace_values(v, key, old, new)
