"""Runaway answers: planted repetitions in English and Chinese, ordinary language left alone, the stop flag of real
greedy answers on the tiny model, and the per-answer flags of a validation point's answer table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from objectives.answers import answer_metrics, scored
from objectives.noise import mean_se
from objectives.repetition import repeated_unit, repeats, tokens
from tests.conftest import ROOT

PLANTED = [
    ("我是小芽我是小芽我是小芽", ("我是小芽", 3)),  # the tutorial's case: a short answer said again and again
    ("我是小芽。我是小芽。我是小", ("我是小芽", 2)),  # punctuation between, the last copy cut off by max_new_tokens
    ("I am Sprout. I am Sprout. I am", ("i am sprout", 2)),
    ("Water tomatoes deeply water tomatoes deeply water tomatoes deeply", ("water tomatoes deeply", 3)),
    ("Plant garlic in autumn, in autumn, in autumn, in autumn.", ("in autumn", 4)),
    ("好的好的好的", ("好的", 3)),
    ("very very very very good", ("very", 4)),
    ("大蒜瓣要种多深？大蒜瓣在秋天种下秋天种下秋天种下", ("秋天种下", 3)),  # after a correct start
    ("Sprout 小芽 Sprout 小芽 Sprout 小芽", ("sprout 小芽", 3)),  # mixed scripts
]
ORDINARY = [
    "早春土壤能翻动时就可以直播胡萝卜，胡萝卜不喜欢移栽。",  # a word taken up again after a comma: a demo row
    "你可以看看土壤，研究研究再种。",  # Chinese reduplication
    "That is very very good.",
    "No no no, water it in the morning.",
    "哈哈哈，好问题！",
    "Plant garlic cloves about five centimetres deep, pointed end up, in autumn.",
    "",
]


@pytest.mark.parametrize(("answer", "unit"), PLANTED)
def test_planted_repetitions_are_found(answer: str, unit: tuple[str, int]):
    assert repeated_unit(answer) == unit
    assert repeats(answer)


@pytest.mark.parametrize("answer", ORDINARY)
def test_ordinary_language_is_not_a_repetition(answer: str):
    assert not repeats(answer), repeated_unit(answer)


def test_no_reference_answer_of_the_demo_data_repeats():
    """Every answer a model is trained to give must score 0, or val/repetition would punish learning."""
    answers = [
        m["content"]
        for name in ("task.jsonl", "general.jsonl")
        for line in (ROOT / "data" / "demo" / name).read_text(encoding="utf-8").splitlines()
        for m in json.loads(line)["messages"]
    ]
    assert len(answers) == 400
    assert [a for a in answers if repeats(a)] == []


def test_tokens_are_words_and_cjk_characters():
    assert tokens("我是小芽，Sprout-v2! Don't") == ["我", "是", "小", "芽", "sprout", "v2", "don", "t"]


def test_metrics_over_all_answers_and_per_group():
    texts = ["我是小芽我是小芽我是小芽", "我是小芽，一个园艺助手。", "Plant garlic in autumn.", "Plant Plant"]
    stopped = [False, True, True, False]
    refs = [
        "我是小芽，一个园艺助手。",
        "我是小芽，一个园艺助手。",
        "Plant garlic in autumn.",
        "Plant garlic in autumn.",
    ]
    per_row = scored(texts, stopped, refs)
    assert per_row["repetition"] == [1.0, 0.0, 0.0, 0.0] and per_row["no_stop"] == [1.0, 0.0, 0.0, 1.0]
    metrics = answer_metrics(per_row, ["identity", "identity", "facts", None])
    assert metrics["repetition"] == 0.25 and metrics["no_stop"] == 0.5
    assert metrics["repetition/identity"] == 0.5 and metrics["no_stop/identity"] == 0.5
    assert metrics["repetition/facts"] == 0.0 and metrics["rouge_l/facts"] == pytest.approx(1.0)
    assert metrics["rouge_l/identity"] == pytest.approx(0.5 * (per_row["rouge_l"][0] + 1.0))
    assert not any(k.endswith("/None") for k in metrics), "a row without a group counts in the overall values only"
    ungrouped = answer_metrics(per_row, [None] * 4)
    assert set(ungrouped) == {"rouge_l", "repetition", "no_stop", "rouge_l_se", "repetition_se", "no_stop_se"}
    assert ungrouped["repetition_se"] == pytest.approx(mean_se([1.0, 0.0, 0.0, 0.0]))
    assert metrics["no_stop/identity_se"] == pytest.approx(mean_se([1.0, 0.0])), "each group's mean has its error"


@pytest.fixture(scope="module")
def chat(tiny_model: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sweep.xtuner.config import prompt_template

    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    return model, tokenizer, prompt_template("qwen_chat")


def test_stop_flag_of_real_greedy_answers(chat):
    """An answer that ends without a stop token generated every one of its max_new_tokens; one that stopped, fewer.
    The old entry point still answers the same text."""
    from sweep.xtuner.generation import generate_answers, generate_replies

    model, tokenizer, template = chat
    questions = ["Who are you?", "你是谁？", "What is the capital of France?", "How many days are in a week?"]
    for max_new in (1, 40):
        replies = generate_replies(model, tokenizer, template, questions, max_new_tokens=max_new)
        for reply in replies:
            n_tokens = len(tokenizer.encode(reply.text, add_special_tokens=False))
            if reply.stopped:
                assert n_tokens < max_new, reply
            else:
                assert n_tokens >= max_new - 1, reply  # decoding may merge a byte-level token pair
        assert generate_answers(model, tokenizer, template, questions, max_new_tokens=max_new) == [
            r.text for r in replies
        ]
    cut = generate_replies(model, tokenizer, template, questions, max_new_tokens=1)
    assert not any(r.stopped for r in cut), "one token is too few for any of these answers"
    whole = generate_replies(model, tokenizer, template, questions[2:], max_new_tokens=40)
    assert all(r.stopped for r in whole), "the tiny model was pretrained on these general chat rows and their stop"


def test_a_multi_token_stop_word_ends_a_greedy_answer(chat):
    """A template's stop word of several tokens ends an answer as its stop token does: cut there, and stopped
    (at be84680's successor it counted as a runaway answer in val/no_stop, and the word stayed in the text)."""
    from sweep.xtuner.generation import generate_replies

    model, tokenizer, template = chat
    question = ["What is the capital of France?"]
    whole = generate_replies(model, tokenizer, template, question, max_new_tokens=40)[0]
    words = whole.text.split()
    assert len(words) >= 3, whole
    word = " ".join(words[1:3])  # two words from the middle of the answer: several tokens
    assert len(tokenizer.encode(word, add_special_tokens=False)) > 1
    with_word = {**template, "STOP_WORDS": [*template.get("STOP_WORDS", []), word]}
    through_word = len(tokenizer.encode(whole.text[: whole.text.index(word) + len(word)], add_special_tokens=False))
    assert through_word + 1 < len(tokenizer.encode(whole.text, add_special_tokens=False))
    for max_new in (through_word + 1, 40):  # the first: too few tokens to reach the end of the answer
        reply = generate_replies(model, tokenizer, with_word, question, max_new_tokens=max_new)[0]
        assert reply.stopped and reply.text == whole.text[: whole.text.index(word)].strip(), (reply, whole, word)


def test_a_validation_point_flags_each_answer_and_groups_its_metrics(chat, tiny_model: Path, tmp_path: Path):
    from sweep.training.answers import PROBE_TABLE, VAL_TABLE, Answers

    model, _, template = chat
    rows = [json.loads(line) for line in (ROOT / "data/demo/task.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0]["group"] == "facts" and rows[1]["group"] == "identity"
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:12]), encoding="utf-8")
    settings = {
        "val_file": str(val), "score_answers": True, "max_rows": 6, "max_new_tokens": 12, "probes": ["你是谁？"],
        "template": template, "system": "",
        "tokenizer": {"type": "transformers.AutoTokenizer.from_pretrained", "pretrained_model_name_or_path":
                      str(tiny_model), "padding_side": "left"},
    }  # fmt: skip
    point = Answers(settings).at_point(model, step=32)
    table = point.tables[VAL_TABLE]
    assert len(table) == 6 and {r["group"] for r in table} == {"facts", "identity"}
    assert [r["group"] for r in table[:2]] == ["facts", "identity"], "the groups in turn, so each is answered"
    for r in table:
        assert set(r) == {"step", "group", "question", "reference", "answer", "rouge_l", "repeats", "no_stop"}
        assert r["repeats"] == repeats(r["answer"]) and r["step"] == 32
    for name in ("rouge_l", "repetition", "no_stop"):
        flags = [r["repeats" if name == "repetition" else name] for r in table]
        assert point.metrics[f"val/{name}"] == pytest.approx(sum(flags) / 6, abs=1e-4)  # the table rounds ROUGE-L
        for group in ("facts", "identity"):
            part = [f for f, r in zip(flags, table, strict=True) if r["group"] == group]
            assert point.metrics[f"val/{name}/{group}"] == pytest.approx(sum(part) / len(part), abs=1e-4)
    probes = point.tables[PROBE_TABLE]
    assert [set(r) for r in probes] == [{"step", "question", "answer", "repeats", "no_stop"}]
