"""XTuner's LLaVA as both sides use it: a trial's multimodal config and its data pipeline.

A LLaVA base config (``model.type`` is XTuner's ``LLaVAModel``: an LLM, a vision tower, a projector between them)
is rendered by ``sweep.xtuner.render`` as a chat config is, plus what only LLaVA has (``render_parts``): the
spec's vision tower and pretrained projector, and ``LLaVADataset`` loaders over the study's split files. Those
files hold chat rows with a picture (``sweep.llava_data``); ``messages_map_fn`` hands them to XTuner's pipeline
laid out as its ``llava_map_fn`` lays out a tutorial row, so a trial trains on the tokens ``xtuner train`` would.

Answers about pictures and the model outside training are ``sweep.xtuner.llava_model``'s (it needs torch; this
module does not, so that `sweep run` can plan and start its workers before importing torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"  # xtuner.utils.DEFAULT_IMAGE_TOKEN
LLAVA_DATASET = "sweep.xtuner.llava.llava_dataset"
MAP_FN = "sweep.xtuner.llava.messages_map_fn"
IMAGE_PROCESSOR = "transformers.CLIPImageProcessor.from_pretrained"
#: What the checkpoint folder holds, by the names ``xtuner convert pth_to_hf`` gives a LLaVA model's parts.
LLM_ADAPTER, VISUAL_ADAPTER, PROJECTOR = "llm_adapter", "visual_encoder_adapter", "projector"


def is_llava(cfg: dict[str, Any]) -> bool:
    """Whether a loaded XTuner config trains a LLaVA model (a vision tower beside its LLM)."""
    model = cfg.get("model")
    return isinstance(model, dict) and isinstance(model.get("visual_encoder"), dict)


def image_first(text: str) -> str:
    """A human turn as XTuner's ``llava_map_fn`` lays it out: the image token first, on its own line."""
    if IMAGE_TOKEN not in text:
        return text
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


def messages_map_fn(example: dict[str, Any]) -> dict[str, Any]:
    """XTuner's ``openai_map_fn`` for a chat row with a picture, with the image token placed as ``llava_map_fn``
    places it (runs inside XTuner's dataset pipeline)."""
    from xtuner.dataset.map_fns import openai_map_fn

    out = openai_map_fn(example)
    for turn in out["conversation"]:
        if turn.get("input"):
            turn["input"] = image_first(turn["input"])
    return out


def image_processor_cfg(spec: Any) -> dict[str, Any]:
    return {"type": IMAGE_PROCESSOR, "pretrained_model_name_or_path": str(spec.model.visual_encoder)}


def llava_dataset(map_num_proc: int = 1, **kwargs: Any) -> Any:
    """XTuner's ``LLaVADataset``, tokenizing its rows in ``map_num_proc`` processes (it passes none, so ``datasets``
    would start 32 of them, a minute of start-up on a 2-core machine for a hundred rows). Its rows are never
    packed, so the process count changes no row."""
    import functools

    import xtuner.dataset.llava as module

    original = module.process_hf_dataset
    module.process_hf_dataset = functools.partial(original, map_num_proc=map_num_proc)
    try:
        return module.LLaVADataset(**kwargs)
    finally:
        module.process_hf_dataset = original


def dataset(path: Path, tokenizer: dict, processor: dict, template: dict, max_length: int, square: bool,
            n_proc: int = 1) -> dict:  # fmt: skip
    """``LLaVADataset`` over one of the study's (or trial's) JSON-lines files; pictures by absolute path."""
    return {
        "type": LLAVA_DATASET,
        "map_num_proc": n_proc,
        "data_path": str(path),
        "image_folder": "",  # os.path.join("", absolute) is the absolute path each row holds
        "tokenizer": tokenizer,
        "image_processor": processor,
        "dataset_map_fn": MAP_FN,
        "template_map_fn": {"type": "xtuner.dataset.map_fns.template_map_fn_factory", "template": template},
        "max_length": max_length,
        "pad_image_to_square": square,
    }


def render_parts(cfg: dict[str, Any], spec: Any, files: Any, base_dataset: dict[str, Any], tokenizer: dict,
                 template: dict, max_length: int, batch_size: int, val_batch_size: int, n_proc: int,
                 cpu: bool) -> None:  # fmt: skip
    """What only a LLaVA config needs changed, in place: vision tower, projector, image processor, the loaders.

    ``base_dataset`` is the base config's own training dataset: its ``pad_image_to_square`` is kept (every loader,
    the test gate and the champion prepare pictures that way)."""
    model = cfg["model"]
    model["visual_encoder"]["pretrained_model_name_or_path"] = str(spec.model.visual_encoder)
    model["pretrained_pth"] = str(spec.model.projector) if spec.model.projector else None
    processor = image_processor_cfg(spec)
    cfg["image_processor"] = processor
    square = bool(base_dataset.get("pad_image_to_square", False))  # LLaVADataset's own default
    loader = cfg["train_dataloader"]
    loader["dataset"] = dataset(files.train, tokenizer, processor, template, max_length, square, n_proc)
    sampler = loader.get("sampler") or {}
    if "per_device_batch_size" in sampler:  # LengthGroupedSampler groups by the batch it will be cut into
        accumulate = int(cfg["optim_wrapper"].get("accumulative_counts") or 1)
        sampler["per_device_batch_size"] = batch_size * accumulate
    if cpu:  # worker processes for a few small pictures cost more start-up than they save on a CPU
        loader["num_workers"] = 0
        loader.pop("persistent_workers", None)
        loader["pin_memory"] = False
    cfg["val_dataloader"] = val_loader(files.val, tokenizer, processor, template, max_length, square, val_batch_size)


def val_loader(path: Path, tokenizer: dict, processor: dict, template: dict, max_length: int, square: bool,
               batch_size: int) -> dict:  # fmt: skip
    """Rows in a fixed order, pictures and all: every trial is scored on the same tokens and pixels."""
    return {
        "batch_size": batch_size,
        "num_workers": 0,
        "dataset": dataset(path, tokenizer, processor, template, max_length, square),
        "sampler": {"type": "mmengine.dataset.DefaultSampler", "shuffle": False},
        "collate_fn": {"type": "xtuner.dataset.collate_fns.default_collate_fn", "use_varlen_attn": False},
    }


def generation_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What answering about a picture needs beside the chat settings (the hook's ``generation.llava``)."""
    ds = cfg["val_dataloader"]["dataset"]
    return {"image_processor": ds["image_processor"], "square": ds["pad_image_to_square"]}


def pads_to_square(config_file: Path) -> bool:
    """Whether a trial's LLaVA loaders padded pictures to a square (its config's ``pad_image_to_square``): the
    champion, `sweep chat` and the test gate prepare pictures the same way."""
    from sweep.xtuner.config import load_config

    return bool(load_config(config_file).val_dataloader.dataset.get("pad_image_to_square", False))
