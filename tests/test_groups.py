"""Groups of held-out rows: how they reach the split, what the spec accepts, and the per-group values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from objectives import group_of, lookup
from objectives.loss import mean_loss
from objectives.noise import loss_se
from sweep import groups
from sweep.data import prepare, split_rows
from sweep.spec import DataSpec, ObjectiveSpec, SpecError, load_spec
from tests.conftest import ROOT, write_spec


def _row(q: str, group: str | None = None) -> dict:
    row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"answer to {q}"}]}
    return {**row, "group": group} if group else row


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_the_demo_split_keeps_groups_on_held_out_rows_only(tmp_path: Path):
    spec = DataSpec(task=ROOT / "data/demo/task.jsonl", general=ROOT / "data/demo/general.jsonl", val=0.15, test=0.1)
    splits = split_rows(spec)
    assert groups.names(splits["val"]) == ["facts", "identity"] and groups.names(splits["test"]) == [
        "facts",
        "identity",
    ]
    assert any("group" in r for r in splits["train"]), "in memory a training row keeps its group (traced to its line)"
    prepared = prepare(spec, tmp_path / "data")
    assert prepared.groups == {"val": ["facts", "identity"], "test": ["facts", "identity"]}
    val = [json.loads(line) for line in prepared.path("val").read_text(encoding="utf-8").splitlines()]
    assert all(r["group"] in ("facts", "identity") for r in val)
    assert '"group"' not in prepared.path("train").read_text(encoding="utf-8"), "training rows are messages alone"


def test_rows_without_groups_split_as_before(tmp_path: Path):
    """The same conversations with and without groups: the same rows in each split, the same training file."""
    plain = [_row(f"q{i}") for i in range(40)]
    grouped = [_row(f"q{i}", "a" if i % 2 else "b") for i in range(40)]
    a = prepare(DataSpec(task=_jsonl(tmp_path / "p.jsonl", plain), val=0.2, test=0.1), tmp_path / "plain")
    b = prepare(DataSpec(task=_jsonl(tmp_path / "g.jsonl", grouped), val=0.2, test=0.1), tmp_path / "grouped")
    assert a.groups == {"val": [], "test": []}
    assert a.hashes["train"] == b.hashes["train"] and a.hashes["val"] != b.hashes["val"]
    strip = [{"messages": json.loads(x)["messages"]} for x in b.path("val").read_text().splitlines()]
    assert strip == [json.loads(x) for x in a.path("val").read_text().splitlines()]


def test_one_file_per_group(tmp_path: Path):
    task = _jsonl(tmp_path / "task.jsonl", [_row(f"t{i}") for i in range(10)])
    identity = _jsonl(tmp_path / "identity.jsonl", [_row("who?"), _row("name?", "identity")])
    new = _jsonl(tmp_path / "new.jsonl", [_row("garlic?")])
    spec_file = write_spec(
        tmp_path, tmp_path, data=f"data:\n  task: {task}\n  val: {{identity: identity.jsonl, new: new.jsonl}}"
    )
    spec = load_spec(spec_file)
    assert spec.data.val == {"identity": identity, "new": new}, "paths relative to the spec file"
    val = split_rows(spec.data)["val"]
    assert [(r["messages"][0]["content"], r["group"]) for r in val] == [
        ("who?", "identity"), ("name?", "identity"), ("garlic?", "new")
    ]  # fmt: skip
    _jsonl(new, [_row("garlic?", "identity")])
    with pytest.raises(SpecError, match=r"new.jsonl: row 0: has group 'identity', but data.val lists this file under"):
        split_rows(spec.data)


@pytest.mark.parametrize(
    ("row", "expected"), [({"group": "a b"}, "group 'a b' is not a group name"), ({"group": 3}, "group 3 is not")]
)
def test_a_bad_group_names_file_and_line(tmp_path: Path, row: dict, expected: str):
    path = _jsonl(tmp_path / "task.jsonl", [_row("ok"), {**_row("q"), **row}])
    with pytest.raises(SpecError, match=f"task.jsonl: line 2: {expected}"):
        split_rows(DataSpec(task=path, val=0.5))


def test_objective_names_per_group_and_limits():
    assert (
        lookup("val/loss/identity").direction == "minimize"
        and lookup("val/loss/identity").test_name == "test/loss/identity"
    )
    assert lookup("val/rouge_l/新") is not None and group_of("val/rouge_l/新") == "新"
    assert lookup("val/general_loss/identity") is None, "general chat rows have no groups"
    assert group_of("val/loss") is None
    objective = ObjectiveSpec(weights={"val/loss/identity": 2.0, "val/loss/facts": 1.0},
                              at_most={"val/repetition": 0.2, "val/no_stop/identity": 0.5})  # fmt: skip
    assert objective.measured == ["val/loss/identity", "val/loss/facts", "val/repetition", "val/no_stop/identity"]
    assert objective.describe().endswith("; feasible if val/repetition <= 0.2, val/no_stop/identity <= 0.5")
    with pytest.raises(ValueError, match="is produced by nothing"):
        ObjectiveSpec(at_most={"val/repetitions": 0.2})
    with pytest.raises(ValueError, match="val/rouge_l: is to maximize"):
        ObjectiveSpec(at_most={"val/rouge_l": 0.2})


def test_spec_answers_validation_rows_when_a_limit_needs_answers(tmp_path: Path, tiny_model: Path):
    spec = load_spec(write_spec(tmp_path, tiny_model, n_trials="n_trials: 1\nobjective: {at_most: {val/no_stop: 0.5}}"))
    assert spec.generation is None and spec.scores_answers


@pytest.mark.parametrize(
    ("objective", "generation", "expected"),
    [
        ("{metric: val/loss/new}", "", "objective: val/loss/new needs validation rows of group 'new'; the validation rows carry facts, identity"),
        ("{metric: val/loss, at_most: {val/repetition/facts: 0.3}}", "generation: {max_rows: 1}",
         "generation.max_rows: the 1 answered validation rows hold none of group 'facts'"),  # the first is identity
    ],
)  # fmt: skip
def test_preflight_refuses_a_group_the_rows_do_not_have(tmp_path, tiny_model, objective, generation, expected):
    from sweep.preflight import check

    extra = f"n_trials: 1\nobjective: {objective}\n{generation}"
    with pytest.raises(SpecError) as err:
        check(load_spec(write_spec(tmp_path, tiny_model, n_trials=extra)))
    assert expected in str(err.value)


def test_answered_rows_take_each_group_in_turn():
    assert groups.answered_rows([None] * 5, 3) == [0, 1, 2], "without groups: the first rows, as before"
    assert groups.answered_rows(["a", "a", "a", "b", None, "b"], 4) == [0, 3, 4, 1]
    assert groups.answered_rows(["a", "b"], 10) == [0, 1]


def test_val_loss_per_group_follows_the_datasets_rows():
    from sweep.training.metrics import ValLossMetric

    metric = ValLossMetric()
    results = [(2.0, 1), (6.0, 3), (9.0, 3), (1.0, 1)]
    assert metric.compute_metrics(results) == {"loss": 18.0 / 8, "loss_se": loss_se(results)}
    metric.groups = ["a", "b", "b", None]
    found = metric.compute_metrics(results)
    assert {k: v for k, v in found.items() if not k.endswith("_se")} == {
        "loss": 18.0 / 8, "loss/a": 2.0, "loss/b": mean_loss(results[1:3])
    }  # fmt: skip
    assert found["loss/b_se"] == loss_se(results[1:3]) and math.isnan(found["loss/a_se"]), "one row: no error"
    metric.groups = ["a"]
    with pytest.raises(RuntimeError, match="4 validation rows scored, but 1 rows' groups"):
        metric.compute_metrics(results)


def test_best_step_of_each_group():
    points = {
        0: {"val/loss": 6.0, "val/loss/identity": 7.0, "val/loss/facts": 5.0},
        32: {"val/loss": 4.0, "val/loss/identity": 5.0, "val/loss/facts": 3.0},
        64: {"val/loss": 3.9, "val/loss/identity": 4.0, "val/loss/facts": 3.5},
        96: {"val/loss": 4.2, "val/loss/identity": 4.0, "val/loss/facts": math.nan},
    }
    assert groups.best_steps(points, "val/loss", ["identity", "facts"]) == {"identity": 64, "facts": 32}
    assert groups.group_metric("val/weighted") == "val/loss" and groups.group_metric("val/rouge_l") == "val/rouge_l"
