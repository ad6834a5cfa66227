"""Groups of held-out rows, measured apart: do edits of what the model knows need more steps than new facts?

The XTuner tutorial's author learned by hand that "changing knowledge the model already has needs more
iterations than teaching new questions". A validation or test row may carry ``"group": "identity"`` (or come
from a file the spec lists under a group: ``data.val: {identity: ..., new: ...}``); every per-group metric is
then also measured on each group's rows (``val/loss/identity``), and each trial records, per group, the step at
which that group was best. Rows without a group count in the overall metrics only, and data without groups
makes no per-group metric at all. Both processes use this module: it imports nothing heavy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from objectives import GROUP_NAME, METRICS, best_of
from sweep.errors import SpecError

KEY = "group"  # the row key


def check_group(value: Any, at: str) -> None:
    """A group name ends metric names (``val/loss/NAME``): letters, digits, ``_``, ``.`` and ``-``."""
    if not isinstance(value, str) or not re.fullmatch(GROUP_NAME, value):
        raise SpecError(f"{at}: group {value!r} is not a group name; expected letters, digits, '_', '.' or '-'")


def names(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The groups some row carries, sorted."""
    return sorted({row[KEY] for row in rows if row.get(KEY) is not None})


def answered_rows(row_groups: Sequence[str | None], max_rows: int) -> list[int]:
    """Which rows (indices) are answered at a validation point: the first ``max_rows``, or, when rows carry groups,
    the first rows of each group in turn (rows without a group as one more), so that every group is answered
    whatever the order of the file."""
    if not any(g is not None for g in row_groups):
        return list(range(min(max_rows, len(row_groups))))
    queues: dict[str | None, list[int]] = {}
    for i, group in enumerate(row_groups):
        queues.setdefault(group, []).append(i)
    picked: list[int] = []
    while len(picked) < min(max_rows, len(row_groups)):
        for queue in queues.values():
            if queue and len(picked) < max_rows:
                picked.append(queue.pop(0))
    return picked


def group_metric(primary: str) -> str:
    """The metric whose per-group twins say when each group was at its best: the primary one when it has twins
    (``val/loss``, ``val/rouge_l``, ...), otherwise ``val/loss`` (a weighted objective, ``val/general_loss``)."""
    metric = METRICS.get(primary)
    return primary if metric is not None and metric.per_group else "val/loss"


def best_steps(points: Mapping[int, Mapping[str, float]], base: str, groups: Iterable[str]) -> dict[str, int]:
    """Per group, the first step at which ``base/GROUP`` was at its best over a trial's validation points."""
    direction = METRICS[base].direction
    out: dict[str, int] = {}
    for group in groups:
        name = f"{base}/{group}"
        curve = [(step, float(values[name])) for step, values in sorted(points.items()) if name in values]
        best = best_of([v for _, v in curve], direction)
        if best == best:
            out[group] = next(step for step, v in curve if v == best)
    return out
