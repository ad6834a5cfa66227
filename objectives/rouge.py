"""ROUGE-L F1 that works for Chinese as well as English.

rouge-score's default tokenizer keeps only ``[a-z0-9]`` runs, so every Chinese answer scores 0.
Here each CJK character (and kana, hangul) is a token and Latin text is tokenized exactly as
rouge-score does it, so English scores equal rouge-score's own.
"""

from __future__ import annotations

import re

from rouge_score import rouge_scorer
from rouge_score.tokenizers import Tokenizer

#: Kana, CJK ideographs and hangul: scripts written without spaces, one token per character.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(f"[{CJK}]|[a-z0-9]+")


class CJKTokenizer(Tokenizer):
    """Lower-cased ``[a-z0-9]+`` words, as rouge-score's default, plus one token per CJK character."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CJKTokenizer())


def rouge_l_each(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (pairs in order)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return [_SCORER.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 of predictions against references (pairs in order); 0.0 for no pairs."""
    scores = rouge_l_each(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0
