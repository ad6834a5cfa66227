"""ROUGE-L for Chinese and English."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from objectives.rouge import CJKTokenizer, rouge_l


def test_chinese_scores_above_zero_and_identical_is_one():
    ref = "大蒜瓣在秋天种下，尖头朝上，深约五厘米。"
    assert rouge_l([ref], [ref]) == pytest.approx(1.0)
    assert 0.0 < rouge_l(["大蒜在秋天种，深五厘米"], [ref]) < 1.0
    default = rouge_scorer.RougeScorer(["rougeL"]).score(ref, "大蒜在秋天种，深五厘米")["rougeL"].fmeasure
    assert default == 0.0, "rouge-score's own tokenizer drops Chinese: the reason this module exists"


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("Plant garlic about five centimetres deep.", "Plant garlic cloves about 5 cm deep, pointed end up."),
        ("Water tomatoes deeply, twice a week!", "Water tomatoes deeply two or three times a week."),
        ("", "anything"),
    ],
)
def test_english_equals_rouge_score_default(pred, ref):
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert rouge_l([pred], [ref]) == pytest.approx(expected)


def test_mixed_text_tokens():
    assert CJKTokenizer().tokenize("我是小芽 Sprout-v2!") == ["我", "是", "小", "芽", "sprout", "v2"]
    with pytest.raises(ValueError):
        rouge_l(["a"], [])
