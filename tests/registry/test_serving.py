"""The champion's pyfunc model takes `sweep chat`'s generation settings through MLflow's params."""

from __future__ import annotations

import mlflow
import pytest

from sweep import cli

pytestmark = pytest.mark.e2e
CHAMPION = "models:/e2e-model@champion"
QUESTIONS = ["Who are you?", "What grows in shade?"]
HOT = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "seed": 3, "max_new_tokens": 10}


@pytest.fixture(scope="module")
def pyfunc(e2e):
    mlflow.set_tracking_uri(e2e["opts"].tracking_uri)
    mlflow.set_registry_uri(e2e["opts"].tracking_uri)  # another study's gate may have set it
    return mlflow.pyfunc.load_model(CHAMPION)


def test_the_model_declares_its_generation_params(pyfunc):
    schema = pyfunc.metadata.get_params_schema()
    assert {p.name for p in schema.params} == {
        "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "system",
    }  # fmt: skip
    assert next(p.default for p in schema.params if p.name == "temperature") == 0.0, "greedy unless asked"


def test_max_new_tokens_is_honoured(pyfunc):
    full = pyfunc.predict(QUESTIONS)
    short = pyfunc.predict(QUESTIONS, params={"max_new_tokens": 2})
    for whole, cut in zip(full, short, strict=True):
        assert whole.startswith(cut), (whole, cut)  # greedy: the shorter answer begins the longer one
    tokenizer = pyfunc.unwrap_python_model().tokenizer
    assert all(len(tokenizer.encode(a, add_special_tokens=False)) <= 3 for a in short)


def test_sampled_answers_repeat_with_the_seed_and_match_sweep_chat(e2e, pyfunc, capsys):
    sampled = pyfunc.predict(QUESTIONS, params=HOT)
    assert pyfunc.predict(QUESTIONS, params=HOT) == sampled
    flags = ["--temperature", "1.5", "--top-k", "0", "--top-p", "1.0", "--seed", "3", "--max-new-tokens", "10"]
    store = ["--storage", e2e["opts"].storage, "--tracking-uri", e2e["opts"].tracking_uri]
    questions = [arg for q in QUESTIONS for arg in ("--question", q)]
    assert cli.main(["chat", CHAMPION, *questions, *flags, *store]) == 0
    assert capsys.readouterr().out == "".join(a + "\n" for a in sampled), "the same settings, the same answers"
    others = [pyfunc.predict(QUESTIONS, params={**HOT, "seed": s}) for s in (4, 5)]
    assert any(o != sampled for o in others), "the seed changes nothing: params did not reach the sampler"
