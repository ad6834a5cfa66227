"""`sweep chat` as `xtuner chat` is used: a multi-turn conversation over stdin, /reset and /exit, sampling flags."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from sweep import cli
from sweep.chat import converse
from sweep.xtuner.conversation import Conversation, Sampling

pytestmark = pytest.mark.e2e
CHAMPION = "models:/e2e-model@champion"
HOT = ["--temperature", "1.5", "--top-k", "0", "--top-p", "1.0", "--max-new-tokens", "12"]


def _store_args(e2e) -> list[str]:
    return ["--storage", e2e["opts"].storage, "--tracking-uri", e2e["opts"].tracking_uri]


def _chat(e2e, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "sweep.cli", "chat", CHAMPION, *args, *_store_args(e2e)],
        input=stdin, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def _answers(stdout: str) -> list[str]:
    """One line per answer (an answer may be empty: what the tiny model learns differs by CPU)."""
    assert stdout.endswith("\n") or not stdout
    return stdout.split("\n")[:-1]


@pytest.fixture(scope="module")
def champion(e2e, tmp_path_factory):
    """The champion loaded in this process, as `sweep chat` loads it."""
    from sweep.registry.export import resolve
    from sweep.registry.scoring import load_adapter_model

    r = resolve(CHAMPION, e2e["opts"].storage, e2e["opts"].tracking_uri, tmp_path_factory.mktemp("champion"))
    model, tokenizer = load_adapter_model(r.base_model, r.adapter, r.quantize, r.cpu_amp)
    return r, model, tokenizer


class Recorder:
    """The model, with the prompt of every ``generate`` call written down."""

    def __init__(self, model) -> None:
        self.model, self.config, self.prompts = model, model.config, []

    def parameters(self):
        return self.model.parameters()

    def generate(self, **kwargs):
        self.prompts.append(kwargs["input_ids"][0].tolist())
        return self.model.generate(**kwargs)


def test_chat_holds_a_conversation_over_stdin(e2e, capsys):
    stdin = "Who are you?\n\n你是谁？\n/reset\nWho are you?\n/bogus\n/exit\nHow deep should I plant garlic?\n"
    out = _chat(e2e, stdin=stdin)
    answers = _answers(out.stdout)
    assert len(answers) == 3, f"three questions before /exit, one answer line each: {out.stdout!r}"
    assert answers[0] == answers[2], "after /reset the first question is asked afresh, so greedy repeats itself"
    assert "(conversation cleared)" in out.stderr and "unknown command /bogus" in out.stderr
    assert "/reset clears the conversation" in out.stderr, "the banner says how to reset and leave"
    assert cli.main(["chat", CHAMPION, "--question", "Who are you?", *_store_args(e2e)]) == 0
    assert capsys.readouterr().out == answers[0] + "\n", "--question answers as the first turn does"


def test_each_turn_is_asked_with_the_conversation_so_far(champion):
    r, model, tokenizer = champion
    recorder, out = Recorder(model), io.StringIO()
    lines = ["Who are you?", "你是谁？", "/reset", "你是谁？"]
    assert (
        converse(recorder, tokenizer, r.template, r.system, Sampling(max_new_tokens=8), lines, out, io.StringIO()) == 0
    )
    first_answer = out.getvalue().split("\n")[0]
    conversation = Conversation(tokenizer, r.template, r.system)
    first = conversation.prompt("Who are you?")
    conversation.add(first, first_answer)
    fresh = Conversation(tokenizer, r.template, r.system).prompt("你是谁？")
    assert recorder.prompts == [first, conversation.prompt("你是谁？"), fresh]
    assert len(recorder.prompts[1]) > len(first) + len(fresh) - 2, "the second turn carries the first one"


def test_sampled_chat_repeats_with_its_seed_and_uses_the_flags(e2e, champion):
    stdin = "What grows in shade?\nAnd in full sun?\n"
    once = _chat(e2e, *HOT, "--seed", "7", stdin=stdin).stdout
    assert _chat(e2e, *HOT, "--seed", "7", stdin=stdin).stdout == once, "same seed, same input: same answers"

    r, model, tokenizer = champion
    sampling = Sampling(max_new_tokens=12, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    here = io.StringIO()
    converse(model, tokenizer, r.template, r.system, sampling, stdin.splitlines(), here, io.StringIO())
    assert here.getvalue() == once, "the flags reached the sampler: the same settings here give the same answers"
    other = io.StringIO()
    converse(model, tokenizer, r.template, r.system, Sampling(**{**sampling.__dict__, "seed": 8}),
             stdin.splitlines(), other, io.StringIO())  # fmt: skip
    greedy = io.StringIO()
    converse(model, tokenizer, r.template, r.system, Sampling(max_new_tokens=12), stdin.splitlines(), greedy,
             io.StringIO())  # fmt: skip
    assert len({once, other.getvalue(), greedy.getvalue()}) > 1, "sampling changes nothing"


def test_bad_sampling_flags_are_refused_before_loading(e2e, capsys):
    assert cli.main(["chat", CHAMPION, "--top-p", "0", *_store_args(e2e)]) == 2
    assert "--top-p: must be in (0, 1]" in capsys.readouterr().err
    assert cli.main(["chat", CHAMPION, "--temperature", "-1", *_store_args(e2e)]) == 2
    assert "--temperature: must be 0 (greedy) or more" in capsys.readouterr().err


def test_an_image_for_a_chat_model_is_refused_before_loading(e2e, capsys, tmp_path):
    """`--image` belongs to LLaVA models: a chat champion says it cannot see pictures (exit 2), loading nothing."""
    picture = tmp_path / "x.png"
    picture.write_bytes(b"")
    rc = cli.main(["chat", CHAMPION, "--image", str(picture), "--question", "What is it?", *_store_args(e2e)])
    err = capsys.readouterr().err
    assert rc == 2 and "--image: models:/e2e-model@champion is a chat model, not a LLaVA model" in err, err
