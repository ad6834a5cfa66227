"""How long the data checks of `sweep validate` / `sweep run` take on 100,000 rows (no model, CPU only).

    .venv/bin/python benchmarks/conflicts_speed.py [N_ROWS]      # default 100000

Writes N synthetic rows to a temporary JSONL file: English and Chinese questions made of words and characters
drawn with Zipf frequencies (a few very common, most rare, as in real text) from 30,000 made-up words and 3,000
Chinese characters, each asked under one of a few shared openings ("Can you tell me:", "请告诉我："), with
planted findings: 1 % of rows are exact copies of another row, 0.5 % ask another
row's question in another case and punctuation (full-width for Chinese) with another answer, and 0.5 % ask it
with one word more or one character more, with another answer. Then it times what preflight does with the data
(read and check the file, split it, find conflicts, duplicates and leakage) and prints each phase's wall-clock
seconds, the whole's CPU seconds (the figure to trust on a shared machine) and the counts found.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweep import conflicts, data  # noqa: E402
from sweep.spec import DataSpec  # noqa: E402

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
HANZI = [chr(cp) for cp in range(0x4E00, 0x4E00 + 3000)]
_made_up = random.Random(1)
WORDS = list(dict.fromkeys("".join(_made_up.choices(SYLLABLES, k=_made_up.randint(1, 4))) for _ in range(40_000)))
WORDS = WORDS[:30_000]


def _zipf(n: int) -> list[float]:
    """Cumulative Zipf weights (the k-th most common item has weight 1/k) for random.choices."""
    total, out = 0.0, []
    for k in range(1, n + 1):
        total += 1.0 / k
        out.append(total)
    return out


WORD_WEIGHTS, HANZI_WEIGHTS = _zipf(len(WORDS)), _zipf(len(HANZI))
OPENINGS_EN = ["{q}?", "Can you tell me: {q}?", "Please explain: {q}?", "{q}? Thanks."]
OPENINGS_ZH = ["{q}？", "请告诉我：{q}？", "{q}呢？"]


def _word(rng: random.Random) -> str:
    return rng.choices(WORDS, cum_weights=WORD_WEIGHTS)[0]


def _hanzi(rng: random.Random, k: int) -> str:
    return "".join(rng.choices(HANZI, cum_weights=HANZI_WEIGHTS, k=k))


def _question(rng: random.Random, chinese: bool) -> str:
    if chinese:
        return rng.choice(OPENINGS_ZH).format(q=_hanzi(rng, rng.randint(6, 14)))
    words = [_word(rng) for _ in range(rng.randint(4, 9))]
    return rng.choice(OPENINGS_EN).format(q=" ".join(words).capitalize())


def _answer(rng: random.Random, chinese: bool) -> str:
    if chinese:
        return _hanzi(rng, rng.randint(10, 30)) + "。"
    return " ".join(_word(rng) for _ in range(rng.randint(6, 16))).capitalize() + "."


def _shout(question: str) -> str:
    """The same question in upper case, with full-width question marks and colons."""
    return question.upper().replace("?", "？").replace(":", "：")


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict] = []
    pairs: list[tuple[str, str, bool]] = []
    while len(out) < n:
        roll = rng.random()
        if pairs and roll < 0.01:
            q, a, _ = rng.choice(pairs)  # an exact copy
        elif pairs and roll < 0.015:
            q, _, zh = rng.choice(pairs)
            q, a = _shout(q), _answer(rng, zh)  # the same question after normalising, another answer
        elif pairs and roll < 0.02:
            q, _, zh = rng.choice(pairs)
            q = q[:-1] + ("的" if zh else " " + _word(rng)) + q[-1]
            a = _answer(rng, zh)  # nearly the same question, another answer
        else:
            zh = rng.random() < 0.4
            q, a = _question(rng, zh), _answer(rng, zh)
            pairs.append((q, a, zh))
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "task.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows(n)), encoding="utf-8")
        size = path.stat().st_size
        spec = DataSpec(task=path, val=0.1, test=0.05)
        import sweep.xtuner.generation  # noqa: F401 - first_turn's module imports torch: paid once, not timed

        conflicts.normalise("")  # builds the punctuation table once per process (part of the import, really)
        t0, c0 = time.perf_counter(), time.process_time()
        files = data.read_files(spec)
        t1 = time.perf_counter()
        splits = data.split_rows(spec, files)
        t2 = time.perf_counter()
        found = conflicts.find(files, splits)
        t3, c3 = time.perf_counter(), time.process_time()
    print(f"{n} rows, {size / 2**20:.1f} MiB")
    print(f"read and check {t1 - t0:.2f} s, split {t2 - t1:.2f} s, find {t3 - t2:.2f} s: "
          f"total {t3 - t0:.2f} s wall, {c3 - c0:.2f} s CPU")  # fmt: skip
    print(found.summary())


if __name__ == "__main__":
    main()
