"""Greedy answers at a validation point: ``val/rouge_l``, ``val/repetition`` and ``val/no_stop`` from the answers to
the first validation rows (and per group of rows), the validation answers' table and the probes' table.

The three metrics come from the same answers, so a trial that learns to echo its answer (``val/repetition``)
or to run on past it (``val/no_stop``) shows it at the point where it starts, beside the ROUGE-L it keeps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objectives.answers import answer_metrics, scored
from objectives.repetition import repeats
from sweep import groups
from sweep.trial import protocol
from sweep.xtuner.generation import first_turn, generate_replies
from sweep.xtuner.llava_model import generate_image_replies

VAL_TABLE = protocol.ValAnswers.table  # the MLflow table (val_answers.json) of the validation answers
PROBE_TABLE = protocol.Samples.table  # the MLflow table (samples.json) of the probes' answers


@dataclass
class AnswerPoint:
    """What one validation point's answers give: metrics, and rows for each answer table."""

    metrics: dict[str, float]
    tables: dict[str, list[dict[str, Any]]]


class Answers:
    """What to ask at each point, read once per trial from the hook's ``generation`` settings."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from xtuner.registry import BUILDER

        self.settings = settings
        self.tokenizer = BUILDER.build(settings["tokenizer"])
        lines = Path(settings["val_file"]).read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        row_groups = [r.get(groups.KEY) for r in rows]
        picked = groups.answered_rows(row_groups, settings["max_rows"])
        pairs = [first_turn(rows[i]["messages"]) for i in picked]
        self.questions = [q for q, _ in pairs]
        self.references = [a for _, a in pairs]
        self.groups = [row_groups[i] for i in picked]
        self.llava = settings.get("llava")  # a LLaVA trial: each question is asked with its picture
        self.images = [rows[i].get("image") for i in picked]
        self.probes = [p if isinstance(p, str) else p["question"] for p in settings["probes"]]
        self.probe_images = [None if isinstance(p, str) else p["image"] for p in settings["probes"]]
        if self.llava:
            self.processor = BUILDER.build(self.llava["image_processor"])

    def _replies(self, model: Any, questions: list[str], images: list[str | None]) -> list[Any]:
        gen = self.settings
        args = dict(template=gen["template"], system=gen["system"], max_new_tokens=gen["max_new_tokens"])
        if self.llava:
            return generate_image_replies(model, self.tokenizer, self.processor, items=list(zip(images, questions, strict=True)),
                                          square=self.llava["square"], **args)  # fmt: skip
        return generate_replies(getattr(model, "llm", model), self.tokenizer, questions=questions, **args)

    def at_point(self, model: Any, step: int) -> AnswerPoint:
        """The answer metrics under ``val/`` (none when not scored) and the rows of each answer table; ``model`` is
        XTuner's (``SupervisedFinetune``, or ``LLaVAModel`` whose answers need its tower) or, for chat, the LLM."""
        gen = self.settings
        point = AnswerPoint({}, {})
        if gen["score_answers"] and self.questions:
            replies = self._replies(model, self.questions, self.images)
            per_row = scored([r.text for r in replies], [r.stopped for r in replies], self.references)
            point.metrics = {f"val/{k}": v for k, v in answer_metrics(per_row, self.groups).items()}
            point.tables[VAL_TABLE] = [
                {"step": step, "group": g or "", "question": q, "reference": ref, "answer": r.text,
                 "rouge_l": round(score, 4), "repeats": bool(rep), "no_stop": not r.stopped}
                for q, ref, g, r, score, rep in zip(self.questions, self.references, self.groups, replies,
                                                    per_row["rouge_l"], per_row["repetition"], strict=True)
            ]  # fmt: skip
        if self.probes:
            replies = self._replies(model, self.probes, self.probe_images)
            point.tables[PROBE_TABLE] = [
                {"step": step, "question": q, "answer": r.text, "repeats": repeats(r.text), "no_stop": not r.stopped}
                for q, r in zip(self.probes, replies, strict=True)
            ]
            if self.llava:  # the picture beside each answer (the sweep logs it into the MLflow table)
                for row, image in zip(point.tables[PROBE_TABLE], self.probe_images, strict=True):
                    row["image"] = image
        if self.llava and VAL_TABLE in point.tables:
            for row, image in zip(point.tables[VAL_TABLE], self.images, strict=True):
                row["image"] = image
        return point
