"""Greedy answers from a chat model in an XTuner prompt template: used during validation and by the champion.

Prompts are laid out as XTuner's template_map_fn lays out the first turn in training (BOS where XTuner's
encode_fn adds one), padded on the left so that a batch decodes with the KV cache, and cut at the
template's stop words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def first_turn(messages: list[dict[str, str]]) -> tuple[str, str]:
    """The question (user text before the first answer) and that answer, as openai_map_fn pairs them."""
    question = []
    for m in messages:
        if m["role"] == "assistant":
            return "".join(question), m["content"]
        if m["role"] == "user":
            question.append(m["content"])
    return "".join(question), ""


def format_prompt(template: dict[str, Any], question: str, system: str = "") -> str:
    prompt = template["SYSTEM"].format(system=system) if system and "SYSTEM" in template else ""
    return prompt + template["INSTRUCTION"].format(input=question, round=1)


def needs_bos(tokenizer: Any) -> bool:
    """XTuner's encode_fn prepends BOS except for the tokenizer families it special-cases."""
    name = type(tokenizer).__name__
    return tokenizer.bos_token_id is not None and not name.startswith(("Qwen", "QWen", "ChatGLM"))


def stop_token_ids(tokenizer: Any, template: dict[str, Any]) -> list[int]:
    stop = [tokenizer.eos_token_id]
    for word in template.get("STOP_WORDS", []):
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) == 1:
            stop.append(ids[0])
    return sorted({i for i in stop if i is not None})


def multi_token_stop_words(tokenizer: Any, template: dict[str, Any]) -> list[str]:
    """Stop words that are not one token: ``generate`` watches for them as text (``stop_strings``)."""
    return [w for w in template.get("STOP_WORDS", []) if len(tokenizer.encode(w, add_special_tokens=False)) != 1]


def cut_at_stop_word(text: str, words: list[str]) -> tuple[str, bool]:
    """The answer before the first stop word in it, and whether there was one."""
    hit = min((i for i in (text.find(w) for w in words) if i >= 0), default=None)
    return (text, False) if hit is None else (text[:hit], True)


@dataclass(frozen=True)
class Reply:
    """One greedy answer, and whether it ended with a stop token (False: cut off at ``max_new_tokens``)."""

    text: str
    stopped: bool


@torch.no_grad()
def generate_replies(
    model: Any,
    tokenizer: Any,
    template: dict[str, Any],
    questions: list[str],
    system: str = "",
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[Reply]:
    """Greedy answers, one per question, in order, each with whether it reached a stop token.

    A row of a batch that finished early is padded after its stop token; a row with no stop token at all ran
    until ``max_new_tokens``: that is how ``val/no_stop`` knows an answer ran away.
    """
    stops = stop_token_ids(tokenizer, template)
    words = multi_token_stop_words(tokenizer, template)  # an answer that ends with one of them stopped too
    extra: dict[str, Any] = {"stop_strings": words, "tokenizer": tokenizer} if words else {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    bos = [tokenizer.bos_token_id] if needs_bos(tokenizer) else []
    device = next(model.parameters()).device
    replies: list[Reply] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        ids = [bos + tokenizer.encode(format_prompt(template, q, system), add_special_tokens=False) for q in chunk]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=stops,
            pad_token_id=pad,
            **extra,
        )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            text, worded = cut_at_stop_word(
                tokenizer.decode(row if cut is None else row[:cut], skip_special_tokens=True), words
            )
            replies.append(Reply(text.strip(), stopped=cut is not None or worded))
    return replies


def generate_answers(
    model: Any,
    tokenizer: Any,
    template: dict[str, Any],
    questions: list[str],
    system: str = "",
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers, one per question, in order."""
    replies = generate_replies(model, tokenizer, template, questions, system, max_new_tokens, batch_size)
    return [r.text for r in replies]
