"""Greedy answers at a validation point: ``val/rouge_l`` against the validation rows' answers, and the probes'
answers that the trial logs as its MLflow answer table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from objectives.rouge import rouge_l
from sweep.xtuner.generation import first_turn, generate_answers


class Answers:
    """What to ask at each point, read once per trial from the hook's ``generation`` settings."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from xtuner.registry import BUILDER

        self.settings = settings
        self.tokenizer = BUILDER.build(settings["tokenizer"])
        lines = Path(settings["val_file"]).read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        pairs = [first_turn(r["messages"]) for r in rows[: settings["max_rows"]]]
        self.questions = [q for q, _ in pairs]
        self.references = [a for _, a in pairs]

    def at_point(self, llm: Any, step: int) -> tuple[float | None, list[dict[str, Any]] | None]:
        """ROUGE-L of the validation answers (None when not scored) and the probe rows (None without probes)."""
        gen = self.settings
        args = dict(template=gen["template"], system=gen["system"], max_new_tokens=gen["max_new_tokens"])
        score = rows = None
        if gen["rouge"] and self.questions:
            score = rouge_l(generate_answers(llm, self.tokenizer, questions=self.questions, **args), self.references)
        if gen["probes"]:
            answers = generate_answers(llm, self.tokenizer, questions=gen["probes"], **args)
            rows = [{"step": step, "question": q, "answer": a} for q, a in zip(gen["probes"], answers, strict=True)]
        return score, rows
