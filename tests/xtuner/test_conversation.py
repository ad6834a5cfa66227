"""Multi-turn prompts as XTuner trains them, greedy and sampled answers, and the streamer that writes them."""

from __future__ import annotations

import pytest
import torch

from sweep.errors import SpecError
from sweep.xtuner.config import prompt_template
from sweep.xtuner.conversation import AnswerStreamer, Conversation, Sampling, generate_reply, seeded
from sweep.xtuner.generation import generate_answers

TURNS = [("你是谁？", "我是小芽。"), ("How deep should I plant garlic?", "About 5 cm deep."), ("Thanks!", "")]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()


def _xtuner_ids(tokenizer, name: str, system: str, turns) -> list[int]:
    """The tokens XTuner trains on for these turns: openai_map_fn, template_map_fn, encode_fn."""
    from xtuner.dataset.map_fns import openai_map_fn, template_map_fn_factory
    from xtuner.dataset.utils import encode_fn
    from xtuner.utils import PROMPT_TEMPLATE

    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer or "x"}]
    row = template_map_fn_factory(PROMPT_TEMPLATE[name])(openai_map_fn({"messages": messages}))
    return encode_fn(row, tokenizer, max_length=10**6)["input_ids"]


@pytest.mark.parametrize("name", ["qwen_chat", "internlm2_chat", "default", "llama2_chat"])
@pytest.mark.parametrize("system", ["", "You are Sprout."])
def test_history_is_laid_out_as_xtuner_trains_a_multi_turn_row(tokenizer, name, system):
    conversation = Conversation(tokenizer, prompt_template(name), system)
    for turn, (question, answer) in enumerate(TURNS):
        prompt = conversation.prompt(question)
        trained = _xtuner_ids(tokenizer, name, system, TURNS[: turn + 1])
        assert trained[: len(prompt)] == prompt, f"turn {turn + 1}: the prompt differs from training's tokens"
        last_answer = tokenizer.encode(answer or "x", add_special_tokens=False)
        assert trained[len(prompt) : len(prompt) + len(last_answer)] == last_answer, (
            "the prompt ends where the answer starts"
        )
        conversation.add(prompt, answer)
    assert conversation.turns == 3
    conversation.reset()
    assert conversation.prompt(TURNS[0][0]) == Conversation(tokenizer, prompt_template(name), system).prompt(
        TURNS[0][0]
    )


def test_round_numbers_reach_the_template(tokenizer):
    template = {"INSTRUCTION": "Round {round}: {input}\n", "SEP": "\n"}
    conversation = Conversation(tokenizer, template)
    conversation.add(conversation.prompt("a"), "b")
    assert "Round 2: c" in tokenizer.decode(conversation.prompt("c"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("temperature", -0.1, "temperature: must be 0"), ("top_p", 0.0, "top_p: must be in (0, 1]"),
     ("top_k", -1, "top_k"), ("max_new_tokens", 0, "max_new_tokens: must be at least 1"),
     ("repetition_penalty", 0.0, "repetition_penalty")],
)  # fmt: skip
def test_bad_sampling_settings_name_the_setting(field, value, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Sampling(**{field: value})


def test_greedy_reply_equals_the_validation_answer(model, tokenizer):
    template = prompt_template("qwen_chat")
    for question in ("Who are you?", "你是谁？", "How deep should I plant garlic cloves?"):
        prompt = Conversation(tokenizer, template, "be brief").prompt(question)
        reply = generate_reply(model, tokenizer, template, prompt, Sampling(max_new_tokens=12))
        assert reply == generate_answers(model, tokenizer, template, [question], "be brief", 12)[0]


def test_sampling_repeats_with_its_seed_and_varies_across_seeds(model, tokenizer):
    template = prompt_template("qwen_chat")
    prompt = Conversation(tokenizer, template).prompt("What grows well in shade?")
    hot = Sampling(max_new_tokens=16, temperature=1.5, top_k=0, top_p=1.0)

    def sample(seed: int) -> str:
        with seeded(seed):
            return generate_reply(model, tokenizer, template, prompt, hot)

    assert sample(1) == sample(1)
    assert len({sample(seed) for seed in range(4)}) > 1, "sampling gave one answer for every seed"
    before = torch.random.get_rng_state()
    sample(5)
    assert torch.equal(torch.random.get_rng_state(), before), "seeded() gives the caller's generator back"


def test_streamed_pieces_make_the_answer(model, tokenizer):
    template = prompt_template("qwen_chat")
    prompt = Conversation(tokenizer, template).prompt("Tell me about tomatoes.")
    hot = Sampling(max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0)
    for seed in range(8):
        pieces: list[str] = []
        with seeded(seed):
            answer = generate_reply(model, tokenizer, template, prompt, hot, pieces.append)
        assert "".join(pieces) == answer
        if len(pieces) > 1:
            return
    pytest.fail("no answer came in more than one piece")


def test_streamer_cuts_at_a_stop_word_and_never_shows_its_beginning(tokenizer):
    pieces: list[str] = []
    streamer = AnswerStreamer(tokenizer, stop_ids=[tokenizer.eos_token_id], stop_words=["<END>"], write=pieces.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt: not shown
    for token in tokenizer.encode(" Plant garlic deep<END> and more", add_special_tokens=False):
        streamer.put(torch.tensor([token]))
        assert "<" not in "".join(pieces), "a stop word's beginning was shown before it could be told apart"
    streamer.end()
    assert streamer.answer == "Plant garlic deep" == "".join(pieces)


def test_streamer_stops_at_a_stop_token(tokenizer):
    streamer = AnswerStreamer(tokenizer, stop_ids=[tokenizer.eos_token_id], stop_words=[])
    streamer.put(torch.tensor([[5]]))
    ids = tokenizer.encode("Water daily", add_special_tokens=False) + [tokenizer.eos_token_id]
    ids += tokenizer.encode(" never shown", add_special_tokens=False)
    streamer.put(torch.tensor(ids))
    streamer.end()
    assert streamer.answer == "Water daily"
