"""Rows that teach two things at once, found before anything trains: conflicts, duplicates and leakage.

The XTuner tutorial's author learned by hand that questions of the same meaning with different answers make
results unstable. No model is needed to find the plainest cases: questions are taken as training pairs them
(the user text before the first answer, ``first_turn``) and compared after normalising what does not change a
question (full-width forms, case, punctuation of any script, spacing). "Nearly the same" is a Jaccard
similarity of at least ``SIMILARITY`` between the questions' token sets: words, and for scripts written without
spaces (Chinese) character bigrams, the usual stand-in for words there. Character bigrams of English would
catch typos too, but English has a few hundred of them, shared by every question, and no index can
then tell candidates apart; its words are selective.

Equal normalised questions are grouped first; the near pairs among the distinct ones come from a
prefix-filtered inverted index (AllPairs: two sets that reach the threshold must share one of their rarest
tokens), so the work grows with the questions that share rare words, not with the square of their count, and
no pair that reaches the threshold is missed.

Exact duplicate rows are counted and never an error: repeating an answer can be a choice (the tutorial repeats
its identity row thousands of times), though the split keeps one copy of each row of a file. Leakage is a
held-out question (validation, test, held-out general chat) that is the same or nearly the same as a question
of the study's actual training rows.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sweep.data import DataFile

#: Two normalised questions are "nearly the same" at this Jaccard similarity of their tokens: one word more in
#: a question of four or more words, one changed word in one of nine or more, a character added to a Chinese
#: question of five or more characters.
SIMILARITY = 0.8
#: How many of each kind of finding are listed; the counts are always exact.
LIMIT = 20
TRAINED = ("train", "general_train")
HELD_OUT = ("val", "test", "general_val")

# Scripts written without spaces between words (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar): a space beside
# one of their characters is layout, not meaning, and a character bigram stands in for a word.
_UNSPACED = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff"
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
)
_LAYOUT_SPACE = re.compile(f" (?=[{_UNSPACED}])|(?<=[{_UNSPACED}]) ")
_RUNS = re.compile(f"[{_UNSPACED}]+|[^ {_UNSPACED}]+")
_UNSPACED_CHAR = re.compile(f"[{_UNSPACED}]")


@functools.cache
def _punctuation() -> dict[int, str]:
    """Every Unicode punctuation character (categories P*, any script) mapped to a space."""
    return {cp: " " for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] == "P"}


def normalise(text: str) -> str:
    """The text as compared: NFKC (full-width letters, digits and spaces become ASCII), casefolded, punctuation
    of any script removed, whitespace collapsed, and no space beside a character of an unspaced script."""
    text = unicodedata.normalize("NFKC", text).casefold().translate(_punctuation())
    return _LAYOUT_SPACE.sub("", " ".join(text.split()))


def tokens(text: str) -> set[str]:
    """What similarity counts in a normalised text: its words, and the character bigrams of unspaced scripts.

    ``"用英语怎么说thank you"`` -> {用英, 英语, 语怎, 怎么, 么说, thank, you}; a lone unspaced character is
    a token of its own.
    """
    if text.isascii():
        return set(text.split(" "))
    out: set[str] = set()
    for run in _RUNS.findall(text):
        if len(run) > 1 and _UNSPACED_CHAR.match(run):
            out.update(map(operator.add, run, run[1:]))
        else:
            out.add(run)
    return out


def jaccard(a: str, b: str) -> float:
    """The similarity of two normalised texts: Jaccard of their ``tokens``."""
    x, y = tokens(a), tokens(b)
    return len(x & y) / len(x | y) if x | y else 1.0


def similar_pairs(texts: list[str], threshold: float = SIMILARITY) -> list[tuple[int, int, float]]:
    """Every pair ``(i, j, similarity)``, i < j, of normalised texts whose ``jaccard`` is at least ``threshold``.

    AllPairs: tokens are ranked rarest first; a set of n tokens can reach the threshold only with a set of at
    least ``threshold * n`` tokens that shares one of its first ``n - ceil(threshold * n) + 1``, so only those
    are indexed and probed, texts are visited smallest first, and each candidate is verified exactly.
    """
    sets = [tokens(t) for t in texts]
    df = Counter(g for s in sets for g in s)
    rank = {g: r for r, g in enumerate(sorted(df, key=df.__getitem__))}  # a stable sort: ties in a fixed order
    index: dict[str, list[int]] = defaultdict(list)  # token -> texts with it in their prefix, smallest first
    start: dict[str, int] = defaultdict(int)  # token -> how many of those are now too small to reach the threshold
    out = []
    for i in sorted(range(len(texts)), key=lambda k: len(sets[k])):
        s = sets[i]
        n = len(s)
        least = threshold * n - 1e-9
        seen: set[int] = set()
        for g in sorted(s, key=rank.__getitem__)[: n - math.ceil(least) + 1]:
            if df[g] == 1:
                continue  # no other text has it
            posting = index[g]
            first = start[g]
            while first < len(posting) and len(sets[posting[first]]) < least:
                first += 1  # texts come smallest first: too small now is too small for every later one
            start[g] = first
            for j in posting[first:]:
                if j in seen:
                    continue
                seen.add(j)
                m = len(sets[j])
                common = len(s & sets[j])
                sim = common / (n + m - common)
                if sim >= threshold - 1e-9:
                    out.append((min(i, j), max(i, j), sim))
            posting.append(i)
    return sorted(out)


@dataclass(frozen=True)
class Row:
    """One row as a finding names it: where it is, its question and its answer (as written)."""

    where: str
    question: str
    answer: str
    split: str = ""  # leakage only: the split it landed in


@dataclass(frozen=True)
class Conflict:
    """Two rows whose questions are the same (similarity 1.0 after normalising) or nearly, with different answers."""

    a: Row
    b: Row
    similarity: float


@dataclass(frozen=True)
class Duplicates:
    """One row that occurs ``count`` times, word for word (``where``: its first few places)."""

    count: int
    where: list[str]
    question: str
    answer: str


@dataclass(frozen=True)
class Leak:
    """A held-out row whose question is also (or nearly) the question of a training row."""

    held_out: Row
    trained: Row
    similarity: float


@dataclass
class Findings:
    """What ``find`` found. Lists hold the first ``limit`` findings of each kind; the counts are exact.

    ``n_conflicts`` counts pairs of distinct question/answer pairs (a repeated row counts once),
    ``n_conflict_questions`` the distinct normalised questions among them, ``n_duplicates`` the rows that
    repeat an earlier row word for word (in ``n_duplicate_groups`` groups), ``n_leaks`` the held-out rows
    whose question is trained on (None: no split was checked).
    """

    rows: int = 0
    threshold: float = SIMILARITY
    conflicts: list[Conflict] = field(default_factory=list)
    n_conflicts: int = 0
    n_conflict_questions: int = 0
    duplicates: list[Duplicates] = field(default_factory=list)
    n_duplicates: int = 0
    n_duplicate_groups: int = 0
    leaks: list[Leak] = field(default_factory=list)
    n_leaks: int | None = None
    compared: bool = True  # False: rows not compared (LLaVA rows: a question's answer depends on its picture)

    @property
    def problems(self) -> bool:
        """Conflicts or leakage: what ``data.conflicts: error`` refuses (duplicates never are)."""
        return bool(self.n_conflicts or self.n_leaks)

    def metrics(self) -> dict[str, int]:
        if not self.compared:
            return {}  # not measured: no zero that reads as "none found"
        out = {
            "data_conflicts": self.n_conflicts,
            "data_conflict_questions": self.n_conflict_questions,
            "data_duplicates": self.n_duplicates,
        }
        if self.n_leaks is not None:
            out["data_leaks"] = self.n_leaks
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "similarity_threshold": self.threshold, **self.metrics(),
                "data_duplicate_groups": self.n_duplicate_groups,
                "conflicts": [asdict(c) for c in self.conflicts],
                "duplicates": [asdict(d) for d in self.duplicates],
                "leaks": [asdict(v) for v in self.leaks]}  # fmt: skip

    def problem_text(self) -> str:
        """The problems in words: what a warning or an error says there is."""
        parts = []
        if self.n_conflicts:
            parts.append(
                f"{self.n_conflicts} pair(s) of rows ask the same or nearly the same question "
                f"({self.n_conflict_questions} question(s)) with different answers"
            )
        if self.n_leaks:
            parts.append(f"{self.n_leaks} held-out row(s) ask a question that is also trained on")
        return " and ".join(parts) or "no conflicting rows and no leakage"

    def summary(self) -> str:
        """One line: the counts."""
        if not self.compared:
            return f"{self.rows} rows, not compared (questions about pictures: the answer depends on the picture)"
        parts = [
            f"{self.rows} rows",
            f"{self.n_conflicts} conflicting pair(s) ({self.n_conflict_questions} question(s))",
            f"{self.n_duplicates} exact duplicate row(s) ({self.n_duplicate_groups} distinct)",
        ]
        if self.n_leaks is not None:
            parts.append(f"{self.n_leaks} held-out row(s) whose question is trained on")
        return ", ".join(parts) + f" (questions nearly the same: similarity >= {self.threshold:g})"

    def lines(self, limit: int | None = None, duplicates: bool = True) -> list[str]:
        """The listed findings, a few lines each, for a terminal or an error message."""
        out: list[str] = []
        for c in self.conflicts[:limit]:
            out += [f"conflict, {_how(c.a, c.b, c.similarity)}:", *_row_lines(c.a), *_row_lines(c.b)]
        for d in self.duplicates[:limit] if duplicates else []:
            more = f" (and {d.count - len(d.where)} more)" if d.count > len(d.where) else ""
            out += [f"duplicate x{d.count}: {', '.join(d.where)}{more}", f"    Q: {_clip(d.question)}"]
        for leak in self.leaks[:limit]:
            how = _how(leak.held_out, leak.trained, leak.similarity)
            out += [f"leak, {how}:", *_row_lines(leak.held_out), *_row_lines(leak.trained)]
        return out


def _how(a: Row, b: Row, similarity: float) -> str:
    return "same question" if _key(a.question) == _key(b.question) else f"similar question ({similarity:.2f})"


def _row_lines(row: Row) -> list[str]:
    split = f" ({row.split})" if row.split else ""
    return [f"  {row.where}{split}", f"    Q: {_clip(row.question)}", f"    A: {_clip(row.answer)}"]


def _clip(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return json.dumps(text if len(text) <= width else text[: width - 1] + "…", ensure_ascii=False)


def _question_answer(row: dict[str, Any]) -> tuple[str, str]:
    # imported here: sweep.xtuner.generation imports torch, which `import sweep.conflicts` need not pay for
    from sweep.xtuner.generation import first_turn

    return first_turn(row["messages"])


def _key(text: str) -> str:
    """The normalised text; a text that is all punctuation stays itself (``?`` and ``!`` are not one question)."""
    return normalise(text) or text.strip()


def find(
    files: Mapping[Path, DataFile] | Iterable[DataFile],
    splits: Mapping[str, list[dict[str, Any]]] | None = None,
    threshold: float = SIMILARITY,
    limit: int = LIMIT,
) -> Findings:
    """Conflicts and exact duplicates across the data files; leakage in ``splits`` (``data.split_rows``).

    Rows of ``splits`` are traced back to their file and line when they are the objects of ``files``
    (``split_rows(spec, files)`` keeps them); others are named by split and position.
    """
    found = Findings(threshold=threshold)
    groups: dict[str, list[Row]] = {}  # normalised question -> its distinct rows, first occurrence each
    copies: dict[Any, list] = {}  # a row's content -> [count, first places, question, answer, its key]
    seen: dict[int, tuple[str, str]] = {}  # id(row) -> (where, normalised question), for the rows of the splits
    for file in files.values() if isinstance(files, Mapping) else files:
        for i, row in enumerate(file.rows):
            where = file.where(i)
            found.rows += 1
            content = _content(row["messages"])
            copy = copies.get(content)
            if copy is not None:
                copy[0] += 1
                if len(copy[1]) < 5:
                    copy[1].append(where)
                seen[id(row)] = where, copy[4]
                continue  # a copy adds nothing to compare
            question, answer = _question_answer(row)
            q = _key(question)
            copies[content] = [1, [where], question, answer, q]
            seen[id(row)] = where, q
            if q:  # a row that starts with an answer asks nothing
                groups.setdefault(q, []).append(Row(where, question, answer))

    for count, where, question, answer, _ in copies.values():
        if count > 1:
            found.n_duplicates += count - 1
            found.n_duplicate_groups += 1
            if len(found.duplicates) < limit:
                found.duplicates.append(Duplicates(count, where, question, answer))

    @functools.cache
    def answers(q: str) -> dict[str, Row]:
        """The distinct answers to a question, normalised (only where a question is asked twice or nearly)."""
        out: dict[str, Row] = {}
        for row in groups[q]:
            out.setdefault(_key(row.answer), row)
        return out

    questions = list(groups)
    near = similar_pairs(questions, threshold)
    involved: set[str] = set()
    for q, rows in groups.items():  # equal after normalising: listed first
        if len(rows) > 1 and len(answers(q)) > 1:
            involved.add(q)
            k = len(answers(q))
            found.n_conflicts += k * (k - 1) // 2
            first, *others = answers(q).values()
            for other in others:
                if len(found.conflicts) < limit:
                    found.conflicts.append(Conflict(first, other, 1.0))
    for i, j, sim in near:
        a, b = answers(questions[i]), answers(questions[j])
        pairs = len(a) * len(b) - len(a.keys() & b.keys())
        if not pairs:
            continue
        involved.update((questions[i], questions[j]))
        found.n_conflicts += pairs
        for ka, ra in a.items():
            if len(found.conflicts) >= limit:
                break
            for kb, rb in b.items():
                if ka != kb and len(found.conflicts) < limit:
                    found.conflicts.append(Conflict(ra, rb, sim))
    found.n_conflict_questions = len(involved)

    if splits is not None:
        _find_leaks(found, splits, questions, near, seen, limit)
    return found


def _content(messages: list[dict[str, Any]]) -> Any:
    """A row's identity, as ``data.row_key`` has it (equal messages, keys in any order), cheaper to make."""
    if all(len(m) == 2 for m in messages):  # role and content only (both are checked to be there)
        return tuple((m["role"], m["content"]) for m in messages)
    try:
        return tuple(tuple(sorted(m.items())) for m in messages)
    except TypeError:  # a value that cannot be hashed (a list or object inside a message)
        return json.dumps(messages, ensure_ascii=False, sort_keys=True)


def _find_leaks(
    found: Findings,
    splits: Mapping[str, list[dict[str, Any]]],
    questions: list[str],
    near: list[tuple[int, int, float]],
    seen: dict[int, tuple[str, str]],
    limit: int,
) -> None:
    neighbours: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for i, j, sim in near:
        neighbours[questions[i]].append((questions[j], sim))
        neighbours[questions[j]].append((questions[i], sim))
    for links in neighbours.values():
        links.sort(key=lambda link: -link[1])

    def key(row: dict[str, Any]) -> str:
        known = seen.get(id(row))
        return known[1] if known else _key(_question_answer(row)[0])

    def row_of(split: str, k: int, row: dict[str, Any]) -> Row:
        question, answer = _question_answer(row)
        known = seen.get(id(row))
        return Row(known[0] if known else f"{split}[{k}]", question, answer, split)

    trained: dict[str, tuple[str, int, dict[str, Any]]] = {}  # normalised question -> its first training row
    for split in TRAINED:
        for k, row in enumerate(splits.get(split, [])):
            trained.setdefault(key(row), (split, k, row))
    trained.pop("", None)
    found.n_leaks = 0
    for split in HELD_OUT:
        for k, row in enumerate(splits.get(split, [])):
            q = key(row)
            match = (q, 1.0) if q in trained else next(((o, s) for o, s in neighbours.get(q, []) if o in trained), None)
            if match is None:
                continue
            found.n_leaks += 1
            if len(found.leaks) < limit:
                found.leaks.append(Leak(row_of(split, k, row), row_of(*trained[match[0]]), match[1]))
