"""XTuner's LLaVA as both sides use it: a trial's multimodal config, its data pipeline, and answers about pictures.

A LLaVA base config (``model.type`` is XTuner's ``LLaVAModel``: an LLM, a vision tower, a projector between them)
is rendered by ``sweep.xtuner.render`` as a chat config is, plus what only LLaVA has (``render_parts``): the
spec's vision tower and pretrained projector, and ``LLaVADataset`` loaders over the study's split files. Those
files hold chat rows with a picture (``sweep.llava_data``); ``messages_map_fn`` hands them to XTuner's pipeline
laid out as its ``llava_map_fn`` lays out a tutorial row, so a trial trains on the tokens ``xtuner train`` would.

Answers (validation, the test gate, the champion) go through ``generate_image_replies``: the picture's features
where XTuner's ``encode_fn`` puts the image token, batches padded on the left, greedy, cut at the template's stop
words, like ``sweep.xtuner.generation`` for chat. ``load_llava`` builds the same model outside training from the
folders ``xtuner convert pth_to_hf`` writes (``llm_adapter/``, ``visual_encoder_adapter/``, ``projector/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sweep.xtuner.generation import Reply, format_prompt, needs_bos, stop_token_ids

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


# -- pictures in, answers out ------------------------------------------------------------------------------------
def pixels(paths: list[str], processor: Any, square: bool = True) -> torch.Tensor:
    """The pictures as ``LLaVADataset`` hands them to the model (padded to a square with the mean colour)."""
    from PIL import Image
    from xtuner.dataset.utils import expand2square

    out = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        if square:
            image = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
        out.append(processor.preprocess(image, return_tensors="pt")["pixel_values"][0])
    return torch.stack(out)


def image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """What ``LLaVAModel.forward`` puts where the image token was: the projected patch features (no CLS)."""
    tower = model.visual_encoder
    dtype = next(tower.parameters()).dtype
    out = tower(pixel_values.to(device=next(tower.parameters()).device, dtype=dtype), output_hidden_states=True)
    return model.projector(out.hidden_states[getattr(model, "visual_select_layer", -2)][:, 1:])


@torch.no_grad()
def generate_image_replies(model: Any, tokenizer: Any, processor: Any, template: dict[str, Any],
                           items: list[tuple[str | None, str]], system: str = "", max_new_tokens: int = 64,
                           square: bool = True, batch_size: int = 8) -> list[Reply]:  # fmt: skip
    """Greedy answers to (picture or None, question) pairs, in order, each with whether it reached a stop token.

    ``model`` has XTuner's LLaVA parts (``llm``, ``visual_encoder``, ``projector``): a trial's ``LLaVAModel`` or
    ``load_llava``'s. A question without the image token gets it first, as ``llava_map_fn`` does for a probe.
    """
    llm = model.llm
    embed = llm.get_input_embeddings()
    device = embed.weight.device
    stops = stop_token_ids(tokenizer, template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    bos = [tokenizer.bos_token_id] if needs_bos(tokenizer) else []
    replies: list[Reply] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pictured = [image for image, _ in chunk if image]
        feats = image_features(model, pixels(pictured, processor, square)) if pictured else None
        seqs, k = [], 0
        for image, question in chunk:
            text = image_first(question if IMAGE_TOKEN in question or not image else f"{IMAGE_TOKEN}\n{question}")
            prompt = format_prompt(template, text, system)
            before, _, after = prompt.partition(IMAGE_TOKEN) if image else (prompt, "", "")
            parts = [embed(torch.tensor(bos + tokenizer.encode(before, add_special_tokens=False), device=device))]
            if image:
                parts.append(feats[k].to(embed.weight.dtype))
                parts.append(embed(torch.tensor(tokenizer.encode(after, add_special_tokens=False), device=device)))
                k += 1
            seqs.append(torch.cat(parts))
        width = max(s.shape[0] for s in seqs)
        inputs = torch.stack([torch.cat([s.new_zeros(width - s.shape[0], s.shape[1]), s]) for s in seqs])
        mask = torch.tensor([[0] * (width - s.shape[0]) + [1] * s.shape[0] for s in seqs], device=device)
        out = llm.generate(inputs_embeds=inputs, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                           use_cache=True, eos_token_id=stops, pad_token_id=pad)  # fmt: skip
        for row in out.tolist():  # with inputs_embeds alone, generate returns the new tokens only
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            text = tokenizer.decode(row if cut is None else row[:cut], skip_special_tokens=True).strip()
            replies.append(Reply(text, stopped=cut is not None))
    return replies


# -- outside training: the checkpoint folder as a model -----------------------------------------------------------
class LlavaParts(torch.nn.Module):
    """The three parts of a LLaVA model for inference, with the attributes ``LLaVAModel`` has."""

    def __init__(self, llm: Any, visual_encoder: Any, projector: Any, visual_select_layer: int = -2) -> None:
        super().__init__()
        self.llm, self.visual_encoder, self.projector = llm, visual_encoder, projector
        self.visual_select_layer = visual_select_layer


def load_llava(llm_dir: Path, visual_encoder_dir: Path, checkpoint: Path | None, projector_pth: Path | None,
               dtype: torch.dtype, device: str, trust_remote_code: bool = False,
               quantization_config: Any = None) -> LlavaParts:  # fmt: skip
    """A LLaVA model from its base folders and a checkpoint folder in ``xtuner convert pth_to_hf``'s layout.

    Without ``checkpoint`` it is the untrained model a sweep starts from: the base LLM and tower, and the
    projector of ``projector_pth`` (XTuner's ``pretrained_pth``), so the test gate can show what training gained.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CLIPVisionModel
    from xtuner.model.modules import ProjectorConfig, ProjectorModel

    kwargs: dict[str, Any] = {"torch_dtype": dtype, "trust_remote_code": trust_remote_code}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": 0})
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, **kwargs)
    tower = CLIPVisionModel.from_pretrained(visual_encoder_dir, torch_dtype=dtype)
    if checkpoint is not None and (checkpoint / LLM_ADAPTER).is_dir():
        llm = PeftModel.from_pretrained(llm, str(checkpoint / LLM_ADAPTER))
    if checkpoint is not None and (checkpoint / VISUAL_ADAPTER).is_dir():
        tower = PeftModel.from_pretrained(tower, str(checkpoint / VISUAL_ADAPTER))
    if checkpoint is not None:
        projector = ProjectorModel.from_pretrained(str(checkpoint / PROJECTOR))
    else:
        projector = ProjectorModel(ProjectorConfig(visual_hidden_size=tower.config.hidden_size,
                                                   llm_hidden_size=llm.config.hidden_size, depth=2))  # fmt: skip
        if projector_pth is not None:
            from xtuner.model.utils import guess_load_checkpoint

            state = guess_load_checkpoint(str(projector_pth))
            projector.load_state_dict({k.removeprefix("projector."): v for k, v in state.items()
                                       if k.startswith("projector.")})  # fmt: skip
    parts = LlavaParts(llm, tower, projector.to(dtype))
    if quantization_config is None:
        parts = parts.to(device)
    else:
        parts.visual_encoder.to(device)
        parts.projector.to(device)
    return parts.eval()


@torch.no_grad()
def token_losses(parts: LlavaParts, batch: dict[str, Any]) -> list[tuple[float, int]]:
    """``val/loss``'s parts (summed cross-entropy and token count per row) of one ``LLaVADataset`` batch."""
    from xtuner.model.utils import prepare_inputs_labels_for_multimodal

    from objectives.loss import token_loss_sum

    data = dict(batch["data"])
    device = parts.llm.get_input_embeddings().weight.device
    data = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    if "pixel_values" in data:
        data["pixel_values"] = image_features(parts, data["pixel_values"])
    data = prepare_inputs_labels_for_multimodal(llm=parts.llm, **data)
    labels = data.pop("labels")
    logits = parts.llm(**data).logits
    return [token_loss_sum(logits[i], labels[i]) for i in range(logits.shape[0])]
