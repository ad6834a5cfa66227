"""Runaway answers: a phrase said again right after itself, and answers that never reached a stop word.

The XTuner tutorial's author learned by hand that "when an answer is short, the trained model randomly
repeats it many times" ("我是小芽我是小芽我是小芽"). Such an answer can keep a fair ROUGE-L (it holds the
reference's words) and a low validation loss (the loss is taken on the reference's tokens, never on what the
model says after them), so it is counted on its own.

Text is cut into words and single CJK characters, case and punctuation ignored, so English and Chinese are
judged alike. An answer repeats when a unit of tokens follows itself back to back: a unit of two or more tokens
and ``MIN_CHARS`` or more characters twice ("I am Sprout. I am Sprout.", "我是小芽我是小芽"), or any unit
``MIN_COPIES`` or more times over ``MIN_SPAN`` tokens or more ("very very very very", "好的好的好的"). Shorter
echoes are ordinary language and do not count: Chinese reduplication (看看, 研究研究), a word taken up again
after a comma (胡萝卜，胡萝卜不喜欢移栽), "very very", "no no no".
"""

from __future__ import annotations

import re

from objectives.rouge import CJK

#: One token per CJK character; any other run of letters and digits is a word.
_TOKEN = re.compile(f"[{CJK}]|[^\\W_{CJK}]+")
_CJK_CHAR = re.compile(f"[{CJK}]")
MIN_CHARS = 4  # a unit of 2+ tokens and this many characters, said twice in a row, is a repetition
MIN_COPIES = 3  # any other unit must come this many times in a row...
MIN_SPAN = 4  # ...and cover this many tokens in all


def tokens(text: str) -> list[str]:
    """Lower-cased words and single CJK characters, punctuation dropped."""
    return _TOKEN.findall(text.lower())


def repeated_unit(text: str) -> tuple[str, int] | None:
    """The first unit that repeats back to back, as text, and how many times in a row; None if none."""
    toks = tokens(text)
    n_toks = len(toks)
    for start in range(n_toks):
        for size in range(1, (n_toks - start) // 2 + 1):
            if toks[start + size] != toks[start]:
                continue  # the cheap test first: almost every (start, size) fails here
            unit = toks[start : start + size]
            copies = 1
            while toks[start + copies * size : start + (copies + 1) * size] == unit:
                copies += 1
            if _counts(unit, copies):
                return _join(unit), copies
    return None


def _join(unit: list[str]) -> str:
    """Words with spaces between them, CJK characters without."""
    text = unit[0]
    for before, tok in zip(unit, unit[1:], strict=False):
        text += tok if _CJK_CHAR.fullmatch(before) and _CJK_CHAR.fullmatch(tok) else " " + tok
    return text


def _counts(unit: list[str], copies: int) -> bool:
    long_unit = len(unit) >= 2 and sum(len(t) for t in unit) >= MIN_CHARS
    return copies >= 2 and (long_unit or (copies >= MIN_COPIES and len(unit) * copies >= MIN_SPAN))


def repeats(text: str) -> bool:
    """Whether the answer says some unit again right after itself (see the module's rule)."""
    return repeated_unit(text) is not None
