"""What greedy answers are scored by, in validation and in the test gate alike: each answer's ROUGE-L against its
reference and its two runaway flags (``objectives.repetition``), then their means over all answers and over the
answers of each group of rows."""

from __future__ import annotations

from objectives import by_group
from objectives.noise import mean_se, se_name
from objectives.repetition import repeats
from objectives.rouge import rouge_l_each


def scored(texts: list[str], stopped: list[bool], references: list[str]) -> dict[str, list[float]]:
    """Each answer's ``rouge_l`` against its reference, and its ``repetition`` and ``no_stop`` flags as 0/1."""
    return {
        "rouge_l": rouge_l_each(texts, references),
        "repetition": [float(repeats(t)) for t in texts],
        "no_stop": [float(not s) for s in stopped],
    }


def answer_metrics(per_row: dict[str, list[float]], row_groups: list[str | None]) -> dict[str, float]:
    """The mean of each per-row value over all answers (``rouge_l``) and over each group's (``rouge_l/GROUP``), and
    the standard error of each mean (``rouge_l_se``, ``rouge_l/GROUP_se``: how far other rows could move it)."""
    metrics = {name: _mean(values) for name, values in per_row.items() if values}
    metrics.update({se_name(name): mean_se(values) for name, values in per_row.items() if values})
    for name, values in per_row.items():
        for g, part in by_group(values, row_groups).items():
            metrics.update({f"{name}/{g}": _mean(part), se_name(f"{name}/{g}"): mean_se(part)})
    return metrics


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
