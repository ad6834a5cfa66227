"""Multi-turn chat in an XTuner prompt template, greedy or sampled, streamed: `sweep chat` and the champion.

A conversation's tokens are laid out as XTuner's ``template_map_fn`` and ``encode_fn`` lay out a multi-turn row in
training: ``INSTRUCTION`` with its ``{round}``, the ``SYSTEM`` text in the first turn only, each answer followed by
the template's ``SUFFIX``, EOS unless ``SUFFIX_AS_EOS``, then ``SEP``, and BOS before a turn where ``encode_fn`` puts
one. `xtuner chat` builds the same text by decoding its own output; here the history is kept as token ids and each
answer is encoded again from its text, exactly as training encodes it. The sampling settings are `xtuner chat`'s
flags; temperature 0 means greedy decoding, the answers that validation and the test gate score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from sweep.errors import SpecError
from sweep.xtuner.generation import multi_token_stop_words, needs_bos, stop_token_ids


@dataclass(frozen=True)
class Sampling:
    """How answers are decoded: `xtuner chat`'s flags, with greedy decoding (temperature 0) as the default.

    ``top_k``, ``top_p`` and the seed matter only when ``temperature > 0``; their defaults are `xtuner chat`'s.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.75
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = {
            "max_new_tokens": (self.max_new_tokens >= 1, "at least 1"),
            "temperature": (self.temperature >= 0, "0 (greedy) or more"),
            "top_k": (self.top_k >= 0, "0 (off) or more"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "repetition_penalty": (self.repetition_penalty > 0, "above 0 (1.0: off)"),
        }
        for name, (ok, want) in problems.items():
            if not ok:
                raise SpecError(f"{name}: must be {want}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict[str, Any]:
        """``model.generate`` arguments; greedy decoding passes no sampling settings (transformers warns on them)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.greedy:
            return {**kwargs, "do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


@dataclass
class Conversation:
    """The turns so far, as the token ids XTuner's ``encode_fn`` makes of the same multi-turn row."""

    tokenizer: Any
    template: dict[str, Any]
    system: str = ""
    ids: list[int] = field(default_factory=list)
    turns: int = 0
    _bos_next: bool = True  # encode_fn: BOS before the first turn, and after each turn that ended with EOS

    def reset(self) -> None:
        self.ids, self.turns, self._bos_next = [], 0, True

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def prompt(self, question: str) -> list[int]:
        """The history, then this turn's prompt: what the model continues with its answer."""
        text = ""
        if self.turns == 0 and self.system and "SYSTEM" in self.template:
            text = self.template["SYSTEM"].format(system=self.system)
        text += self.template["INSTRUCTION"].format(input=question, round=self.turns + 1)
        bos = [self.tokenizer.bos_token_id] if self._bos_next and needs_bos(self.tokenizer) else []
        return self.ids + bos + self._encode(text)

    def add(self, prompt: list[int], answer: str) -> None:
        """Keep a finished turn: its prompt (from ``prompt``), the answer with SUFFIX, EOS where due, and SEP."""
        suffix_is_eos = bool(self.template.get("SUFFIX_AS_EOS", False))
        tail = [] if suffix_is_eos or self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        self.ids = prompt + self._encode(answer + self.template.get("SUFFIX", "")) + tail
        self.ids += self._encode(self.template.get("SEP", ""))
        self.turns += 1
        self._bos_next = not suffix_is_eos


class AnswerStreamer(BaseStreamer):
    """An answer as ``generate`` makes it: cut at the template's stop words, written in whole characters.

    ``write`` gets each new piece of text; ``answer`` is the final text, stripped, equal to all the pieces joined.
    Text that may still turn into a stop word, an unfinished UTF-8 character and trailing whitespace are held
    back until the next token settles them.
    """

    def __init__(
        self, tokenizer: Any, stop_ids: list[int], stop_words: list[str], write: Callable[[str], Any] | None = None
    ) -> None:
        self.tokenizer, self.stop_ids, self.stop_words, self.write = tokenizer, set(stop_ids), stop_words, write
        self.ids: list[int] = []
        self.shown = ""
        self._prompt_seen = False
        self._stopped = False
        self.answer = ""

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() hands over the prompt first
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self._stopped or token in self.stop_ids:
                self._stopped = True
                break
            self.ids.append(token)
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _text(self) -> tuple[str, bool]:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(w) for w in self.stop_words if w) if i >= 0]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def _emit(self, final: bool) -> None:
        text, hit_stop = self._text()
        text = text.lstrip()
        if final or hit_stop:
            text = text.rstrip()
        else:
            text = text.rstrip("\ufffd").rstrip()
            for word in self.stop_words:  # a stop word's beginning at the end: wait for the next token
                for n in range(min(len(word) - 1, len(text)), 0, -1):
                    if text.endswith(word[:n]):
                        text = text[:-n]
                        break
        if text.startswith(self.shown) and len(text) > len(self.shown):
            piece, self.shown = text[len(self.shown) :], text
            if self.write is not None:
                self.write(piece)
        if final:
            self.answer = text


@torch.no_grad()
def generate_reply(
    model: Any,
    tokenizer: Any,
    template: dict[str, Any],
    prompt: list[int],
    sampling: Sampling,
    write: Callable[[str], Any] | None = None,
) -> str:
    """One answer to a prompt of token ids (``Conversation.prompt``), streamed to ``write`` as it is generated.

    With ``sampling.greedy`` the answer to a one-turn prompt is the one ``generation.generate_answers`` gives.
    Sampling draws from torch's global generator: seed it first (``seeded``) for repeatable answers.
    """
    stops = stop_token_ids(tokenizer, template)
    words = multi_token_stop_words(tokenizer, template)
    streamer = AnswerStreamer(tokenizer, stops, words, write)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt], device=device)
    extra: dict[str, Any] = {"stop_strings": words, "tokenizer": tokenizer} if words else {}
    model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
        use_cache=True,
        streamer=streamer,
        **sampling.generate_kwargs(),
        **extra,
    )
    return streamer.answer


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Torch's generators seeded for a block and given back as they were: repeatable samples, no side effects."""
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield
