"""XTuner's LLaVA model at work: answers about pictures, and the model built outside training.

Answers (validation, the test gate, the champion) go through ``generate_image_replies``: the picture's features
where XTuner's ``encode_fn`` puts the image token, batches padded on the left, greedy, cut at the template's stop
words, like ``sweep.xtuner.generation`` for chat. ``load_llava`` builds the same model outside training from the
folders ``xtuner convert pth_to_hf`` writes (``llm_adapter/``, ``visual_encoder_adapter/``, ``projector/``).
The config side (rendering, data pipeline) is ``sweep.xtuner.llava``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sweep.xtuner.generation import Reply, format_prompt, needs_bos, stop_token_ids
from sweep.xtuner.llava import IMAGE_TOKEN, LLM_ADAPTER, PROJECTOR, VISUAL_ADAPTER, image_first


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
