"""`sweep chat`: talk to an adapter in its own prompt template, as `xtuner chat --adapter` does.

Each question is asked with the conversation so far, laid out as training lays out a multi-turn row
(``sweep.xtuner.conversation``), and its answer is streamed as it is generated. ``/reset`` forgets the
conversation, ``/exit`` (or Ctrl-D) ends it, and Ctrl-C stops an answer, which is then not kept. Questions come
from a terminal (with line editing) or one per line from a pipe; answers go to stdout, one line each, and
everything else to stderr, so a script can hold a conversation too. ``answer_each`` serves ``--question``:
every question on its own, no history; ``answer_about_image`` serves a LLaVA model's ``--image``: each question
asked alone about one picture.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from sweep.xtuner.conversation import Conversation, Sampling, generate_reply, seeded

#: One word after a slash, alone on its line: a command, not a question.
COMMAND = re.compile(r"^/[A-Za-z]+$")
RESET = ("/reset",)
EXIT = ("/exit", "/quit")
HELP = "/reset clears the conversation, /exit (or Ctrl-D) ends it"


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def answer_each(
    model: Any,
    tokenizer: Any,
    template: dict[str, Any],
    system: str,
    sampling: Sampling,
    questions: Iterable[str],
    out: TextIO,
) -> None:
    """One answer per question, each asked alone (for scripts); sampled answers repeat for the same seed."""
    with seeded(sampling.seed, _device(model)):
        for question in questions:
            conversation = Conversation(tokenizer, template, system)
            print(generate_reply(model, tokenizer, template, conversation.prompt(question), sampling), file=out)


def answer_about_image(model: Any, tokenizer: Any, processor: Any, template: dict[str, Any], system: str,
                       max_new_tokens: int, image: str | None, square: bool, questions: Iterable[str],
                       out: TextIO) -> None:  # fmt: skip
    """A LLaVA model's greedy answer to each question about ``image`` (None: no picture), one line each; a line
    ``/exit`` ends, as in a chat."""
    from sweep.xtuner.llava_model import generate_image_replies

    for line in questions:
        question = line.strip()
        if question in EXIT:
            return
        if question:
            reply = generate_image_replies(model, tokenizer, processor, template, [(image, question)], system,
                                           max_new_tokens, square)[0]  # fmt: skip
            print(reply.text, file=out, flush=True)


def terminal_lines(stdin: TextIO = sys.stdin, prompt: str = ">>> ") -> Iterator[str]:
    """Lines typed at a terminal (``input``: line editing and history) or read from a pipe, until end of input."""
    interactive = stdin.isatty()
    while True:
        if interactive:
            try:
                line = input(prompt)
            except EOFError:
                print(file=sys.stderr)
                return
        else:
            line = stdin.readline()
            if not line:
                return
        yield line.rstrip("\r\n")


def converse(
    model: Any,
    tokenizer: Any,
    template: dict[str, Any],
    system: str,
    sampling: Sampling,
    lines: Iterable[str],
    out: TextIO,
    err: TextIO,
) -> int:
    """A multi-turn chat over ``lines``; returns the exit code (0)."""
    conversation = Conversation(tokenizer, template, system)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    with seeded(sampling.seed, _device(model)):
        try:
            for line in lines:
                question = line.strip()
                if not question:
                    continue
                if COMMAND.match(question):
                    if question in EXIT:
                        return 0
                    if question in RESET:
                        conversation.reset()
                        print("(conversation cleared)", file=err)
                    else:
                        print(f"unknown command {question}: {HELP}", file=err)
                    continue
                prompt = conversation.prompt(question)
                if limit and conversation.turns and len(prompt) + sampling.max_new_tokens > limit:
                    conversation.reset()  # as `xtuner chat` does when the history outgrows the model
                    print(f"(conversation cleared: it would outgrow the model's {limit} positions)", file=err)
                    prompt = conversation.prompt(question)
                try:
                    answer = generate_reply(model, tokenizer, template, prompt, sampling, write)
                except KeyboardInterrupt:
                    print(file=out, flush=True)
                    print("(answer stopped; it is not kept in the conversation)", file=err)
                    continue
                print(file=out, flush=True)
                conversation.add(prompt, answer)
        except KeyboardInterrupt:
            print(file=err)
    return 0
