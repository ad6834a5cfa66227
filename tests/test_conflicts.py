"""Conflicting rows, exact duplicates and leakage, found before anything trains (issue 18, part 1).

The planted rows go into a copy of the bundled demo data, so each finding is a real row against a real row.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from sweep import conflicts
from sweep.cli import main
from sweep.conflicts import jaccard, normalise, similar_pairs, tokens
from sweep.data import read_files, split_rows
from sweep.spec import DataSpec
from tests.conftest import ROOT, write_spec

DEMO_TASK = ROOT / "data" / "demo" / "task.jsonl"
DEMO_GENERAL = ROOT / "data" / "demo" / "general.jsonl"

# (question, answer): each planted row and the demo row it must be found against, if any
SAME_EN = ("WHO ARE YOU？", "I am Basil, a cooking assistant.")  # case and a full-width question mark
SAME_WIDE = ("Ｗｈａｔ　ｉｓ　ｙｏｕｒ　ｎａｍｅ", "Basil.")  # full-width letters and space, no mark at all
SAME_ZH = ("你是谁?", "我是罗勒，一个做饭助手。")  # an ASCII question mark where the demo has a full-width one
NEAR_EN = ("How deep should I plant the garlic cloves?", "Ten centimetres deep.")  # one word more
NEAR_ZH = ("大蒜瓣要种多深呢？", "十厘米深。")  # one character more
OTHER_EN = ("How often should I water cucumbers?", "Every day in summer.")  # demo asks about tomatoes
OTHER_ZH = ("黄瓜多久浇一次水？", "夏天每天浇。")  # demo asks 番茄多久浇一次水？
SAME_ANSWER = ("when should i pick strawberries", "pick strawberries when they are fully red all over early in the morning while they are cool")  # fmt: skip
PLANTED = [SAME_EN, SAME_WIDE, SAME_ZH, NEAR_EN, NEAR_ZH, OTHER_EN, OTHER_ZH, SAME_ANSWER]


def _row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _demo_lines() -> dict[str, int]:
    """Each demo question's line in data/demo/task.jsonl."""
    lines = DEMO_TASK.read_text(encoding="utf-8").splitlines()
    return {json.loads(line)["messages"][0]["content"]: n for n, line in enumerate(lines, start=1)}


def _planted_task(folder: Path, repeat: int = 3) -> tuple[Path, dict[tuple[str, str], int]]:
    """The demo task rows, the planted rows after them, then the demo's first row ``repeat`` more times."""
    text = DEMO_TASK.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    n = len(text.splitlines())
    lines = {row: n + i for i, row in enumerate(PLANTED, start=1)}
    extra = "".join(json.dumps(_row(*row), ensure_ascii=False) + "\n" for row in PLANTED) + (first + "\n") * repeat
    path = folder / "task.jsonl"
    path.write_text(text + extra, encoding="utf-8")
    return path, lines


def _pairs(found: conflicts.Findings) -> set[tuple[str, str]]:
    return {tuple(sorted((c.a.where, c.b.where))) for c in found.conflicts}


def test_normalise_full_width_case_punctuation_and_spacing():
    assert normalise("Ｗｈｏ　ａｒｅ　ｙｏｕ？") == normalise("Who are you") == "who are you"
    assert normalise("你是谁？") == normalise("你是谁?") == normalise(" 你 是 谁 ！") == "你是谁"
    assert normalise("「你是谁」") == normalise("【你是谁】") == "你是谁"
    assert normalise("¿Qué   tal?") == "qué tal" and normalise("كيف حالك؟") == "كيف حالك"  # Spanish, Arabic marks
    assert normalise("Hello,world…") == normalise("hello — world") == "hello world"  # a mark between words splits them
    assert normalise("用英语怎么说 thank you？") == "用英语怎么说thank you"
    assert tokens(normalise("用英语怎么说 thank you？")) == {"用英", "英语", "语怎", "怎么", "么说", "thank", "you"}
    assert normalise("1+1=2") == "1+1=2", "symbols are not punctuation: 1+1 and 1-1 are other questions"


def test_near_means_one_word_or_one_character_more():
    assert jaccard(normalise(NEAR_EN[0]), normalise("How deep should I plant garlic cloves?")) == pytest.approx(7 / 8)
    assert jaccard(normalise(NEAR_ZH[0]), normalise("大蒜瓣要种多深？")) == pytest.approx(6 / 7)
    assert jaccard(normalise(OTHER_EN[0]), normalise("How often should I water tomatoes?")) < conflicts.SIMILARITY
    assert jaccard(normalise(OTHER_ZH[0]), normalise("番茄多久浇一次水？")) < conflicts.SIMILARITY


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9])
def test_the_index_finds_every_pair_brute_force_finds(threshold):
    """Prefix filtering must not miss a pair: compared with all pairs, on texts made to be near one another."""
    rng = random.Random(threshold)
    words = [f"w{i}" for i in range(200)]
    hanzi = [chr(0x4E00 + i) for i in range(200)]
    texts = []
    for _ in range(40):  # a base text, then copies of it with one to three words or characters changed
        zh = rng.random() < 0.5
        units = rng.choices(hanzi if zh else words, k=rng.randint(1, 30))
        for _ in range(10):
            edited = list(units)
            for _ in range(rng.randint(0, 3)):
                pick = rng.choice(hanzi if zh else words)
                at = rng.randint(0, len(edited))
                if rng.random() < 0.4:
                    edited.insert(at, pick)
                elif edited:
                    edited[min(at, len(edited) - 1)] = pick
            texts.append(("" if zh else " ").join(edited))
    texts = list(dict.fromkeys(normalise(t) for t in texts))
    brute = {
        (i, j)
        for i in range(len(texts))
        for j in range(i + 1, len(texts))
        if jaccard(texts[i], texts[j]) >= threshold - 1e-9
    }
    found = similar_pairs(texts, threshold)
    assert {(i, j) for i, j, _ in found} == brute
    assert len(brute) > 20, "the texts must be near enough to test anything"
    assert all(sim == pytest.approx(jaccard(texts[i], texts[j])) for i, j, sim in found)


def test_planted_conflicts_are_found_in_the_demo_data(tmp_path):
    task, planted = _planted_task(tmp_path)
    demo = _demo_lines()
    found = conflicts.find(read_files(DataSpec(task=task)))
    at = f"{task}:{{}}".format
    expected = {
        tuple(sorted((at(demo["Who are you?"]), at(planted[SAME_EN])))),
        tuple(sorted((at(demo["What is your name?"]), at(planted[SAME_WIDE])))),
        tuple(sorted((at(demo["你是谁？"]), at(planted[SAME_ZH])))),
        tuple(sorted((at(demo["How deep should I plant garlic cloves?"]), at(planted[NEAR_EN])))),
        tuple(sorted((at(demo["大蒜瓣要种多深？"]), at(planted[NEAR_ZH])))),
    }
    assert _pairs(found) == expected, "every planted conflict, and nothing else (not the other questions)"
    assert found.n_conflicts == 5 and found.n_conflict_questions == 7  # 3 shared questions, 2 near pairs
    by_where = {c.b.where: c for c in found.conflicts}
    assert by_where[at(planted[SAME_EN])].similarity == 1.0
    assert by_where[at(planted[NEAR_ZH])].similarity == pytest.approx(6 / 7)
    zh = by_where[at(planted[SAME_ZH])]
    assert zh.a.answer.startswith("我") and zh.b.answer == SAME_ZH[1], "both answers, as written"
    # exact copies are counted, never conflicts: the demo's first row four times
    assert found.n_duplicates == 3 and found.n_duplicate_groups == 1
    assert found.duplicates[0].count == 4 and found.duplicates[0].where[0] == at(1)
    assert found.problems and found.n_leaks is None  # no split given: leakage not checked


def test_listing_is_bounded_and_counts_stay_exact(tmp_path):
    rows = [_row("Who are you?", f"I am helper number {i}.") for i in range(30)]
    path = tmp_path / "task.json"  # a JSON list: rows are named by index
    path.write_text(json.dumps(rows), encoding="utf-8")
    found = conflicts.find(read_files(DataSpec(task=path)), limit=4)
    assert found.n_conflicts == 30 * 29 // 2 and found.n_conflict_questions == 1
    assert len(found.conflicts) == 4 and found.conflicts[0].a.where == f"{path}[0]"
    text = "\n".join(found.lines())
    assert f"{path}[1]" in text and '"I am helper number 1."' in text and text.count("conflict,") == 4


def test_the_demo_data_is_clean():
    """The demo repeats its identity answers across many different questions: that is no conflict."""
    spec = DataSpec(task=DEMO_TASK, general=DEMO_GENERAL, val=0.15, test=0.1)
    files = read_files(spec)
    found = conflicts.find(files, split_rows(spec, files))
    answers = [json.loads(line)["messages"][1]["content"] for line in DEMO_TASK.read_text().splitlines()]
    assert max(answers.count(a) for a in answers) >= 5, "the demo does repeat identity answers"
    assert (found.n_conflicts, found.n_duplicates, found.n_leaks) == (0, 0, 0), found.lines()
    assert found.rows == 200


def test_leakage_is_checked_on_the_studys_split(tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text(DEMO_TASK.read_text(encoding="utf-8"), encoding="utf-8")
    val = tmp_path / "val.jsonl"
    held = [
        _row("who are you", "I'm Sprout."),  # a training question, normalised; another answer
        _row("How deep should I plant the garlic cloves?", "Plant garlic cloves about five centimetres deep."),
        _row("What is the best fertiliser for roses?", "Rose feed."),  # a question nobody trains on
    ]
    val.write_text("".join(json.dumps(r) + "\n" for r in held), encoding="utf-8")
    spec = DataSpec(task=task, val=val)
    files = read_files(spec)
    found = conflicts.find(files, split_rows(spec, files))
    demo = _demo_lines()
    leaks = {(leak.held_out.where, leak.trained.where, round(leak.similarity, 3)) for leak in found.leaks}
    assert leaks == {
        (f"{val}:1", f"{task}:{demo['Who are you?']}", 1.0),
        (f"{val}:2", f"{task}:{demo['How deep should I plant garlic cloves?']}", 0.875),
    }
    assert found.n_leaks == 2 and {leak.held_out.split for leak in found.leaks} == {"val"}
    assert {leak.trained.split for leak in found.leaks} == {"train"}
    assert found.metrics()["data_leaks"] == 2


def test_rows_of_the_splits_are_named_by_file_and_line_and_answers_alone_ask_nothing(tmp_path):
    task = tmp_path / "task.jsonl"
    rows = [_row("Who are you?", "Sprout.")] + [
        {"messages": [{"role": "assistant", "content": greeting}, {"role": "user", "content": "hi"}]}
        for greeting in ("Hello!", "Good day.")
    ]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    general = tmp_path / "general.jsonl"
    general.write_text(json.dumps(_row("What is two plus three?", "Five.")) + "\n" + json.dumps(rows[0]) + "\n")
    files = read_files(DataSpec(task=task, general=general))
    copy = files[general].rows[1]  # the task's first row, again, in the general file
    found = conflicts.find(files, {"train": [files[task].rows[0]], "general_val": [copy]})
    assert found.n_conflicts == 0, "two rows that open with different answers ask no question"
    assert found.n_duplicates == 1 and found.duplicates[0].where == [f"{task}:1", f"{general}:2"]
    [leak] = found.leaks
    assert (leak.held_out.where, leak.held_out.split) == (f"{general}:2", "general_val")
    assert (leak.trained.where, leak.trained.split) == (f"{task}:1", "train")


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def _spec_with(folder: Path, model: Path, task: Path, mode: str | None, **blocks: str) -> Path:
    extra = f"\n  conflicts: {mode}" if mode else ""
    data = f"data:\n  task: {task}\n  general: {DEMO_GENERAL}\n  val: 0.15\n  seed: 0{extra}"
    return write_spec(folder, model, data=data, **blocks)


def test_error_mode_exits_2_and_creates_nothing(tmp_path, monkeypatch, capsys, tiny_model):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    task, planted = _planted_task(inputs)
    spec = _spec_with(inputs, tiny_model, task, "error")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _files(tmp_path)
    for command in (["run", str(spec)], ["validate", str(spec)]):
        rc = main(command)
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"{spec}: data.conflicts is error, and 5 pair(s) of rows ask the same" in err, err
        lines = (f"{task}:{_demo_lines()['你是谁？']}", f"{task}:{planted[SAME_ZH]}")
        assert all(line in err for line in lines), "both rows, by line"
        assert f'A: "{SAME_ZH[1]}"' in err and 'A: "我是' in err, "both answers"
        assert "Traceback" not in err and err.count("error:") == 1, err
        assert _files(tmp_path) == before, "no study, MLflow store or work dir"


def test_validate_lists_findings_and_warn_is_the_default(tmp_path, capsys, caplog, tiny_model):
    task, planted = _planted_task(tmp_path)
    spec = _spec_with(tmp_path, tiny_model, task, None)
    with caplog.at_level(logging.INFO, logger="sweep"):
        assert main(["validate", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "5 conflicting pair(s) (7 question(s)), 3 exact duplicate row(s) (1 distinct)" in out, out
    assert f"{task}:{planted[NEAR_EN]}" in out and f'A: "{NEAR_EN[1]}"' in out
    assert "conflict, similar question (0.88):" in out and f"duplicate x4: {task}:1," in out
    assert "5 pair(s) of rows ask the same or nearly the same question" in caplog.text
    assert "3 row(s) repeat another row word for word" in caplog.text


@pytest.mark.e2e
def test_warn_mode_trains_and_logs_the_counts_to_the_parent_run(tmp_path, monkeypatch, caplog, tiny_model):
    from mlflow.tracking import MlflowClient

    task, _ = _planted_task(tmp_path)
    spec = _spec_with(
        tmp_path, tiny_model, task, "warn", study="study: conflicted", n_trials="n_trials: 1",
        fixed="fixed: {max_length: 32, max_epochs: 1, batch_size: 8, accumulative_counts: 1}",
        search_space="search_space:\n  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}",
        eval_every="eval_every: 64",
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sweep"):
        rc = main(["run", str(spec), "--storage", f"sqlite:///{tmp_path / 'sweep.db'}",
                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--json"])  # fmt: skip
    assert rc == 0, caplog.text
    assert "pair(s) of rows ask the same or nearly the same question" in caplog.text
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [parent] = client.search_runs(
        [client.get_experiment_by_name("conflicted").experiment_id], "tags.`xtuner_sweep.role` = 'study'"
    )
    metrics = parent.data.metrics
    assert metrics["data_conflicts"] == 5 and metrics["data_duplicates"] == 3 and "data_leaks" in metrics
    logged = json.loads(Path(client.download_artifacts(parent.info.run_id, "data_checks.json")).read_text())
    assert logged["data_conflicts"] == 5 and len(logged["conflicts"]) == 5
    assert {c["b"]["answer"] for c in logged["conflicts"]} >= {SAME_EN[1], NEAR_ZH[1]}
