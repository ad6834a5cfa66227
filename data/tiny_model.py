"""Build the tiny demo chat model, deterministically, from the bundled text: no download involved.

A byte-level BPE tokenizer is trained on data/demo/*.jsonl (with the chat template's special
tokens and a BOS token, which XTuner's encode_fn needs for tokenizers it does not special-case),
and a 4-layer Qwen2-architecture model of about 2.8 M parameters is pretrained briefly on the bundled
general-chat rows (in the chat template) and on the task's sentences as plain text, never as
question-answer pairs: it starts as a (very small) chat model that has read about gardening but
was never taught to answer as the assistant. A random-init model barely moved under LoRA on this
data (validation loss 7.23 -> 7.14), so the demo would have shown nothing. Same inputs, same seed:
same weights (same md5 on every build). The whole recipe takes about 15 s on two CPU cores.

Run: python data/tiny_model.py [--shape tiny|qwen2-1.5b] OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "demo"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 1536


def texts() -> list[str]:
    out = []
    for name in ("task.jsonl", "general.jsonl"):
        for line in (DATA / name).read_text(encoding="utf-8").splitlines():
            out += [m["content"] for m in json.loads(line)["messages"]]
    out += ["system", "user", "assistant", "\n"]
    return out


#: ``--shape qwen2-1.5b``: the Qwen2-1.5B shape (1.5 B parameters, random init, bf16), for GPU runs
#: where speed and memory matter and the loss values do not.
QWEN2_1_5B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
)  # fmt: skip


def build(out: Path, seed: int = 0, shape: str = "tiny") -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    hf_tok = make_tokenizer(texts(), out)
    torch.manual_seed(seed)
    dims = QWEN2_1_5B if shape == "qwen2-1.5b" else dict(
        vocab_size=len(hf_tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    cfg = Qwen2Config(**dims, tie_word_embeddings=True, **token_ids(hf_tok))
    if shape == "qwen2-1.5b":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    else:
        model = Qwen2ForCausalLM(cfg)
        pretrain(model, hf_tok, seed)
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)
    return out


def make_tokenizer(corpus: list[str], out: Path, vocab: int = VOCAB):
    """A byte-level BPE tokenizer trained on ``corpus``, with the chat template's special tokens, saved in ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf_tok.save_pretrained(out)
    return hf_tok


def token_ids(tokenizer) -> dict[str, int]:
    """The model config's BOS, EOS and padding token ids: those of ``make_tokenizer``'s tokenizer."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def pretrain(model, tokenizer, seed: int, steps: int = 300, batch: int = 16, lr: float = 3e-3) -> None:
    """Full-parameter next-token training on the general-chat rows, formatted like qwen_chat."""
    rows = [json.loads(line)["messages"] for line in (DATA / "general.jsonl").read_text(encoding="utf-8").splitlines()]
    texts = [
        "<|endoftext|>" + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        for messages in rows
    ]
    # The task's sentences as plain text, never as question-answer pairs: like a real base model, it
    # has read about gardening but has not been taught to answer as the assistant.
    for line in (DATA / "task.jsonl").read_text(encoding="utf-8").splitlines():
        texts += ["<|endoftext|>" + m["content"] for m in json.loads(line)["messages"]]
    loss = pretrain_texts(model, tokenizer, texts, seed, steps, batch, lr)
    print(f"pretrained on {len(texts)} general rows: final loss {loss:.3f}")


def pretrain_texts(model, tokenizer, texts: list[str], seed: int, steps: int, batch: int, lr: float) -> float:
    """Full-parameter next-token training on ``texts`` (padding masked), batches drawn with a seeded generator;
    returns the last batch's loss."""
    import torch

    enc = tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (batch,), generator=gen)
        out = model(input_ids=enc.input_ids[idx], attention_mask=enc.attention_mask[idx], labels=labels[idx])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return out.loss.item()


def command_line(argv: list[str], script: str, shapes: tuple[str, ...]) -> tuple[str, Path]:
    """The shape (the first of ``shapes`` unless ``--shape`` names another) and OUT_DIR of a build script's
    ``[--shape SHAPE] OUT_DIR``; anything else exits with the script's usage."""
    args, shape = list(argv), shapes[0]
    if len(args) == 3 and args[0] == "--shape" and args[1] in shapes:
        shape, args = args[1], args[2:]
    if len(args) != 1:
        sys.exit(f"usage: python data/{script} [--shape {'|'.join(shapes)}] OUT_DIR")
    return shape, Path(args[0])


if __name__ == "__main__":
    shape, out = command_line(sys.argv[1:], "tiny_model.py", ("tiny", "qwen2-1.5b"))
    path = build(out, shape=shape)
    print(f"tiny model written to {path}")
