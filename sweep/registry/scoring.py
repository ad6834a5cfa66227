"""An adapter scored outside training, on held-out rows: the numbers the test gate compares.

``test/loss`` is ``val/loss``'s definition on other rows: the rows are tokenized by the trial's own
XTuner config (its validation loader with the file swapped), so template, truncation and label
masking are exactly what validation used. ``test/rouge_l``, ``test/repetition`` and ``test/no_stop`` use the
same greedy generation as validation and the champion's pyfunc model. Test rows that carry a group are also
scored per group (``test/loss/identity``), as validation rows are.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from objectives import by_group
from objectives.answers import answer_metrics, scored
from objectives.loss import mean_loss, token_loss_sum
from sweep import groups
from sweep.xtuner import maps
from sweep.xtuner.config import load_config

log = logging.getLogger("sweep")
MAX_GENERATED_ROWS = 256  # generation is the slow part; a larger test split is scored for loss only beyond this


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(cpu_amp: bool = False) -> torch.dtype:
    """The dtype a trained adapter's base model is loaded in: bf16 on a GPU; on the CPU, what it trained in."""
    return torch.bfloat16 if _device() == "cuda" or cpu_amp else torch.float32


def nf4_config():
    """The 4-bit (nf4) config a QLoRA-trained base model is loaded with for inference, computing in bf16."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def release_memory() -> None:
    """What a scored model held, given back (the next model to score may need the GPU's memory)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_adapter_model(
    base_model: Path, adapter: Path, quantize: bool = False, cpu_amp: bool = False, trust_remote_code: bool = False
):
    """The base model with the adapter applied, for inference (``inference_dtype``, nf4 when trained so).

    The whole base model is in one dtype, so activations match its weights without autocast; PEFT keeps
    the adapter in fp32 and casts what flows into it.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _device()
    kwargs: dict[str, Any] = {"torch_dtype": inference_dtype(cpu_amp)}
    if quantize and device == "cuda":
        kwargs["quantization_config"] = nf4_config()
        kwargs["device_map"] = {"": 0}
    tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(base_model, trust_remote_code=trust_remote_code, **kwargs)
    model = PeftModel.from_pretrained(model, str(adapter))
    if "device_map" not in kwargs:
        model = model.to(device)
    return model.eval(), tokenizer


def tokenized_loader(config_file: Path, rows_file: Path):
    """The trial config's validation loader over ``rows_file``: the same tokens validation would see, with the rows'
    own columns (their ``group``) kept beside them in the dataset."""
    import datasets
    from mmengine.runner import Runner

    datasets.disable_progress_bars()  # one tokenizing pass per score: its bars would only clutter the sweep's log
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(config_file)
    loader = copy.deepcopy(cfg.val_dataloader)  # a ConfigDict: XTuner reads the template by attribute
    if "data_path" in loader["dataset"]:  # LLaVADataset keeps every column of its rows already
        loader["dataset"]["data_path"] = str(rows_file)
    else:
        loader["dataset"]["dataset"]["data_files"] = {"train": str(rows_file)}
        loader["dataset"]["remove_unused_columns"] = False
    with maps.built_here():
        return Runner.build_dataloader(loader)


@torch.no_grad()
def score_adapter(
    adapter: Path,
    base_model: Path,
    config_file: Path,
    rows_file: Path,
    *,
    template: dict[str, Any],
    system: str = "",
    answers: bool = False,
    max_new_tokens: int = 48,
    quantize: bool = False,
    cpu_amp: bool = False,
    trust_remote_code: bool = False,
    prefix: str = "test",
) -> dict[str, float]:
    """``{prefix}/loss`` (and, with ``answers``, ``{prefix}/rouge_l``, ``/repetition``, ``/no_stop``) of an adapter on
    the rows of a JSON-lines file, and each per group of rows (``{prefix}/loss/GROUP``) when rows carry one."""
    from sweep.xtuner.generation import first_turn, generate_replies

    model, tokenizer = load_adapter_model(base_model, adapter, quantize, cpu_amp, trust_remote_code)
    device = next(model.parameters()).device
    try:
        parts: list[tuple[float, int]] = []
        loader = tokenized_loader(config_file, rows_file)
        for batch in loader:
            data = batch["data"]
            logits = model(
                input_ids=data["input_ids"].to(device), attention_mask=data["attention_mask"].to(device)
            ).logits
            parts += [token_loss_sum(logits[i], data["labels"][i]) for i in range(logits.shape[0])]
        scores = _loss_scores(parts, loader, prefix)
        if answers:
            tokenizer.padding_side = "left"

            def reply(rows: list[dict[str, Any]], model: Any = model) -> list[Any]:
                questions = [first_turn(r["messages"])[0] for r in rows]
                return generate_replies(model, tokenizer, template, questions, system, max_new_tokens)

            scores.update(_answer_scores(rows_file, prefix, reply))
        return scores
    finally:
        del model
        release_memory()


def _loss_scores(parts: list[tuple[float, int]], loader: Any, prefix: str) -> dict[str, float]:
    scores = {f"{prefix}/loss": mean_loss(parts)}
    dataset = getattr(loader.dataset, "text_data", loader.dataset)  # LLaVADataset keeps its rows' columns there
    if groups.KEY in dataset.column_names:  # row i of the dataset is part i: the loader does not shuffle
        by = by_group(parts, list(dataset[groups.KEY]))
        scores.update({f"{prefix}/loss/{g}": mean_loss(p) for g, p in by.items()})
    return scores


def _answer_scores(rows_file: Path, prefix: str, reply: Any) -> dict[str, float]:
    """ROUGE-L, repetition and runaway answers of the greedy answers ``reply`` gives to the first rows (of each
    group in turn), as validation scores its answers."""
    from sweep.xtuner.generation import first_turn

    lines = rows_file.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    row_groups = [r.get(groups.KEY) for r in rows]
    picked = groups.answered_rows(row_groups, MAX_GENERATED_ROWS)
    replies = reply([rows[i] for i in picked])
    references = [first_turn(rows[i]["messages"])[1] for i in picked]
    per_row = scored([r.text for r in replies], [r.stopped for r in replies], references)
    metrics = answer_metrics(per_row, [row_groups[i] for i in picked])
    return {f"{prefix}/{name}": value for name, value in metrics.items()}


@torch.no_grad()
def score_llava(
    checkpoint: Path | None,
    spec: Any,
    config_file: Path,
    rows_file: Path,
    *,
    answers: bool = False,
    max_new_tokens: int = 48,
    prefix: str = "test",
) -> dict[str, float]:
    """``score_adapter`` for a LLaVA checkpoint folder (``llm_adapter/``, ``visual_encoder_adapter/``,
    ``projector/``): the same metrics on rows with pictures, each question asked with its picture. Without
    ``checkpoint``, the untrained model the study started from (base LLM and tower, the spec's projector)."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    from sweep.xtuner.config import prompt_template
    from sweep.xtuner.llava_model import generate_image_replies, load_llava, token_losses

    device = _device()
    quantization = nf4_config() if spec.model.quantize and device == "cuda" else None
    model = load_llava(spec.model.path, spec.model.visual_encoder, checkpoint, spec.model.projector,
                       inference_dtype(spec.cpu_amp), device, spec.model.trust_remote_code, quantization)  # fmt: skip
    try:
        loader = tokenized_loader(config_file, rows_file)
        parts: list[tuple[float, int]] = []
        for batch in loader:
            parts += token_losses(model, batch)
        scores = _loss_scores(parts, loader, prefix)
        if answers:
            tokenizer = AutoTokenizer.from_pretrained(spec.model.path, trust_remote_code=spec.model.trust_remote_code)
            processor = CLIPImageProcessor.from_pretrained(spec.model.visual_encoder)
            square = bool(loader.dataset.pad_image_to_square)
            template = prompt_template(spec.model.template)

            def reply(rows: list[dict[str, Any]], model: Any = model) -> list[Any]:
                from sweep.xtuner.generation import first_turn

                items = [(r.get("image"), first_turn(r["messages"])[0]) for r in rows]
                return generate_image_replies(model, tokenizer, processor, template, items, spec.model.system,
                                              max_new_tokens, square)  # fmt: skip

            scores.update(_answer_scores(rows_file, prefix, reply))
        return scores
    finally:
        del model
        release_memory()
