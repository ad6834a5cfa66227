"""Build the tiny LLaVA demo parts, deterministically, from the bundled pictures and text: no download involved.

Three parts, in the folders the tutorial's LLaVA config names:
- ``llm/``: a 2-layer Qwen2-shaped chat model with its own byte-level BPE tokenizer (``tiny_model.make_tokenizer``),
  pretrained as plain text on the demo's answers and questions, never as question-answer pairs;
- ``visual_encoder/``: a CLIP-shaped vision tower (``CLIPVisionModel``, 56 x 56 pictures, 14 x 14 patches, width 64)
  and its ``CLIPImageProcessor``;
- ``projector.pth``: XTuner's 2-layer projector, as ``pretrained_pth`` (keys ``projector.model.*``).
The vision tower and projector are then trained together (LLaVA's stage 1, "pretrain", with the LLM frozen) to
caption each picture, so the LLM receives features that say colour and shape: the fine-tune a sweep runs
(stage 2) has to teach it to answer questions about them. A random tower and projector would give the
fine-tune nothing to see. Same inputs, same seed: same weights. About 30 s on two CPU cores.

``--shape tutorial`` builds the parts of the XTuner tutorial's shape instead, random init and not trained, for GPU
runs where speed and memory matter and the loss values do not (``benchmarks/gpu_llava.sh``): an LLM of
InternLM2-chat-1.8B's dimensions (as a Llama-architecture model: InternLM2's own modeling code is not in
Transformers and cannot be fetched offline), in bf16, a CLIP-ViT-L/14-336-shaped tower and its 2-layer projector.

Run: python data/tiny_llava.py [--shape tiny|tutorial] OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "llava_demo"
IMAGE_SIZE, PATCH = 56, 14
#: XTuner's LLaVA configs read visual_select_layer=-2: the tower's hidden state before its last layer.
SELECT_LAYER = -2


def _tiny_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_model", HERE / "tiny_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _turns(name: str) -> list[tuple[str, str, str | None]]:
    """(question without <image>, answer, image file name or None) of each row of a bundled file."""
    rows = json.loads((DATA / name).read_text(encoding="utf-8"))
    out = []
    for row in rows:
        human, gpt = row["conversation"][0]["value"], row["conversation"][1]["value"]
        out.append((human.replace("<image>", "").strip(), gpt, row.get("image")))
    return out


def build(out: Path, seed: int = 0, pretrain_steps: int = 200, stage1_steps: int = 300) -> Path:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM
    from xtuner.model.modules import ProjectorConfig, ProjectorModel

    tiny = _tiny_model()
    task, captions, general = _turns("task.json"), _turns("captions.json"), _turns("general.json")
    sentences = sorted({t for q, a, _ in task + captions + general for t in (q, a) if t})
    llm_dir, ve_dir = out / "llm", out / "visual_encoder"
    tokenizer = tiny.make_tokenizer([*sentences, "user", "assistant", "\n"], llm_dir, vocab=512)
    torch.manual_seed(seed)
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        **tiny.token_ids(tokenizer),
    ))  # fmt: skip
    # the sentences as plain text, and the general rows as chat: it knows the words and the template, not the task
    texts = ["<|endoftext|>" + s for s in sentences] + [
        f"<|endoftext|><|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>" for q, a, _ in general
    ]
    loss = tiny.pretrain_texts(llm, tokenizer, texts, seed, steps=pretrain_steps, batch=16, lr=3e-3)
    print(f"LLM pretrained on {len(texts)} texts: final loss {loss:.3f}")
    llm.save_pretrained(llm_dir, safe_serialization=True)
    llm.generation_config.save_pretrained(llm_dir)

    vision = CLIPVisionModel(CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=64,
    ))  # fmt: skip
    processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    projector = ProjectorModel(ProjectorConfig(visual_hidden_size=64, llm_hidden_size=128, depth=2))
    stage1(llm, tokenizer, vision, processor, projector, captions, seed, stage1_steps)
    vision.save_pretrained(ve_dir, safe_serialization=True)
    processor.save_pretrained(ve_dir)
    state = {f"projector.{k}": v.contiguous() for k, v in projector.state_dict().items()}
    torch.save({"state_dict": state}, out / "projector.pth")
    return out


def stage1(llm, tokenizer, vision, processor, projector, captions, seed: int, steps: int) -> None:
    """LLaVA's stage 1: vision tower and projector learn to caption each picture for the frozen LLM, laid out as
    the qwen_chat template lays out ``<image>`` (features where XTuner's encode_fn puts the image token)."""
    import torch
    from PIL import Image

    pixels = processor.preprocess(
        [Image.open(DATA / "img" / img).convert("RGB") for _, _, img in captions], return_tensors="pt"
    )["pixel_values"]
    prefix = tokenizer.encode("<|endoftext|><|im_start|>user\n", add_special_tokens=False)
    answers = [
        tokenizer.encode(f"<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>", add_special_tokens=False)
        for _, a, _ in captions
    ]
    n_prompt = len(tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False))
    width = max(len(a) for a in answers)
    pad = tokenizer.pad_token_id
    after = torch.tensor([a + [pad] * (width - len(a)) for a in answers])
    labels = torch.tensor([[-100] * n_prompt + a[n_prompt:] + [-100] * (width - len(a)) for a in answers])
    mask_after = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers])
    llm.requires_grad_(False)
    embed = llm.get_input_embeddings()
    params = list(vision.parameters()) + list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    vision.train()
    projector.train()
    for _ in range(steps):
        idx = torch.randint(0, len(captions), (16,), generator=gen)
        feats = projector(vision(pixels[idx], output_hidden_states=True).hidden_states[SELECT_LAYER][:, 1:])
        n, n_img = len(idx), feats.shape[1]
        head = embed(torch.tensor([prefix] * n))
        inputs = torch.cat([head, feats, embed(after[idx])], dim=1)
        mask = torch.cat([torch.ones(n, len(prefix) + n_img, dtype=torch.long), mask_after[idx]], dim=1)
        full_labels = torch.cat([torch.full((n, len(prefix) + n_img), -100), labels[idx]], dim=1)
        loss = llm(inputs_embeds=inputs, attention_mask=mask, labels=full_labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    vision.eval()
    projector.eval()
    print(f"stage 1 (vision tower + projector captioning {len(captions)} pictures): final loss {loss.item():.3f}")


#: InternLM2-chat-1.8B's dimensions (its config.json), and CLIP-ViT-L/14-336's vision tower.
INTERNLM2_1_8B = dict(
    vocab_size=92544, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
)  # fmt: skip
CLIP_L_336 = dict(
    image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, projection_dim=768,
)  # fmt: skip


def build_tutorial_shape(out: Path, seed: int = 0) -> Path:
    """The tutorial's LLaVA shape, random init: LLM in bf16, tower and projector in fp32 (as XTuner loads CLIP)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from xtuner.model.modules import ProjectorConfig, ProjectorModel

    tiny = _tiny_model()
    sentences = sorted({t for q, a, _ in _turns("task.json") + _turns("general.json") for t in (q, a) if t})
    tokenizer = tiny.make_tokenizer([*sentences, "user", "assistant", "\n"], out / "llm", vocab=512)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        llm = LlamaForCausalLM(LlamaConfig(**INTERNLM2_1_8B, **tiny.token_ids(tokenizer))).to(torch.bfloat16)
        vision = CLIPVisionModel(CLIPVisionConfig(**CLIP_L_336))
        projector = ProjectorModel(ProjectorConfig(visual_hidden_size=1024, llm_hidden_size=2048, depth=2))
    llm.save_pretrained(out / "llm", safe_serialization=True)
    vision.save_pretrained(out / "visual_encoder", safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(
        out / "visual_encoder"
    )
    state = {f"projector.{k}": v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    torch.save({"state_dict": state}, out / "projector.pth")
    return out


if __name__ == "__main__":
    shape, out = _tiny_model().command_line(sys.argv[1:], "tiny_llava.py", ("tiny", "tutorial"))
    made = build_tutorial_shape(out) if shape == "tutorial" else build(out)
    print(f"LLaVA parts ({shape}) written to {made}")
