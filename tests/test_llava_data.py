"""LLaVA data (sweep.llava_data): tutorial rows read, split like chat rows, and bad rows refused before anything exists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sweep import data as data_mod
from sweep.cli import main
from sweep.spec import load_spec
from tests.conftest import ROOT, assert_run_refused, write_llava_spec

DEMO = ROOT / "data" / "llava_demo"


def _row(i: int, image: str | None = "red_circle_0.png", key: str = "conversation", human: str | None = None) -> dict:
    row = {"id": f"r{i}", key: [{"from": "human", "value": human or f"<image>\nQuestion {i}?"},
                                {"from": "gpt", "value": f"Answer {i}."}]}  # fmt: skip
    if image is not None:
        row["image"] = image
    return row


def _dataset(folder: Path, bad: dict | None = None, n: int = 20) -> tuple[Path, Path]:
    """A JSON list of ``n`` good rows (and ``bad`` last, at index ``n``) beside a copy of two demo pictures."""
    images = folder / "img"
    images.mkdir(parents=True, exist_ok=True)
    for name in ("red_circle_0.png", "blue_square_1.png"):
        shutil.copy(DEMO / "img" / name, images / name)
    rows = [_row(i, "red_circle_0.png" if i % 2 else "blue_square_1.png") for i in range(n)]
    path = folder / "task.json"
    path.write_text(json.dumps(rows + ([bad] if bad else []), ensure_ascii=False), encoding="utf-8")
    return path, images


def _data_block(task: Path, images: Path) -> str:
    return f"data:\n  task: {task}\n  images: {images}\n  val: 0.2\n  seed: 0"


def _unreadable(folder: Path) -> dict:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "img" / "broken.png").write_bytes(b"not a picture at all")
    return _row(99, "broken.png")


CASES = {  # name: (the spec's blocks, from the inputs folder; what the error says)
    "image file missing": (
        lambda d: {"data": _data_block(*_dataset(d, _row(99, "gone.png")))},
        f"task.json: row 20: image {'{inputs}'}/img/gone.png not found",
    ),
    "image unreadable": (
        lambda d: {"data": _data_block(*_dataset(d, _unreadable(d)))},
        "task.json: row 20: image {inputs}/img/broken.png cannot be read as a picture",
    ),
    "row without <image>": (
        lambda d: {"data": _data_block(*_dataset(d, _row(99, human="What is it?")))},
        "task.json: row 20: image 'red_circle_0.png' needs exactly one <image> in the human turns",
    ),
    "<image> without an image": (
        lambda d: {"data": _data_block(*_dataset(d, _row(99, image=None)))},
        "task.json: row 20: says <image> but names no 'image'",
    ),
    "image folder missing": (
        lambda d: {"data": _data_block(_dataset(d)[0], d / "no-such-folder")},
        "data.images: image folder {inputs}/no-such-folder does not exist",
    ),
    "both conversation keys": (
        lambda d: {"data": _data_block(*_dataset(d, {**_row(99), "conversations": []}))},
        "task.json: row 20: expected one of 'conversation' or 'conversations'",
    ),
    "unknown speaker": (
        lambda d: {
            "data": _data_block(
                *_dataset(d, {"image": "red_circle_0.png", "conversation": [{"from": "bot", "value": "<image>x"}]})
            )
        },
        "task.json: row 20: conversation[0].from is 'bot'",
    ),  # fmt: skip
    "probe image missing": (
        lambda d: {"probes": f"probes: [{{image: {d / 'nope.png'}, question: 'What?'}}]"},
        "probes[0]: image {inputs}/nope.png not found",
    ),
    "text probe in a LLaVA spec": (lambda d: {"probes": "probes: ['Who are you?']"}, "probes: a LLaVA spec asks"),
    "visual LoRA on a frozen tower": (
        lambda d: {"base_config": f"base_config: {_no_visual_lora(d)}", "fixed": "fixed: {visual_lora_r: 8}"},
        "fixed.visual_lora_r: base config",
    ),
    "image folder on a chat spec": (
        lambda d: {
            "model": f"model: {{path: {ROOT / '.cache/tiny-model'}}}",
            "probes": "",
            "base_config": "base_config: internlm2_1_8b_qlora_alpaca_e3",
        },
        "data.images: image folders need a LLaVA spec; set model.visual_encoder",
    ),  # fmt: skip
    "chat config with a tower in the spec": (
        lambda d: {"base_config": "base_config: internlm2_1_8b_qlora_alpaca_e3"},
        "model.visual_encoder: base_config internlm2_1_8b_qlora_alpaca_e3 is not a LLaVA config",
    ),
    "LLaVA config without a tower in the spec": (
        lambda d: {
            "model": f"model: {{path: {ROOT / '.cache/tiny-llava/llm'}}}",
            "probes": "",
            "data": f"data:\n  task: {ROOT / 'data/demo/task.jsonl'}\n  val: 0.2",
        },
        "is a LLaVA config (a visual_encoder beside its LLM)",
    ),  # fmt: skip
}


def _no_visual_lora(folder: Path) -> Path:
    """The tutorial's LLaVA config, copied as `xtuner copy-cfg` does, with the tower's LoRA taken out."""
    from xtuner.configs import cfgs_name_path

    text = Path(
        cfgs_name_path["llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune"]
    ).read_text()
    start = text.index("    visual_encoder_lora=dict(")
    end = text.index("),\n", start) + 3
    copy = folder / "my_llava_config.py"
    copy.write_text(text[:start] + text[end:])
    return copy


@pytest.mark.parametrize("case", list(CASES))
def test_bad_llava_input_exits_2_names_file_and_row_and_creates_nothing(case, tmp_path, monkeypatch, capsys,
                                                                        tiny_llava):  # fmt: skip
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    make, expected = CASES[case]
    spec = write_llava_spec(inputs, tiny_llava, **make(inputs))
    assert_run_refused(tmp_path, monkeypatch, capsys, spec, expected.format(inputs=inputs))


def test_tutorial_and_xtuner_spellings_read_the_same(tmp_path):
    """``conversation`` (the tutorial) and ``conversations`` (XTuner) give the same rows: messages, picture, id."""
    from sweep.llava_data import read_file

    tutorial, images = _dataset(tmp_path / "a")
    xtuner_rows = json.loads(tutorial.read_text())
    for row in xtuner_rows:
        row["conversations"] = row.pop("conversation")
    xtuner = tmp_path / "a" / "xtuner.json"
    xtuner.write_text(json.dumps(xtuner_rows))
    a, b = read_file(tutorial, images).rows, read_file(xtuner, images).rows
    assert a == b and len(a) == 20
    assert a[1] == {"messages": [{"role": "user", "content": "<image>\nQuestion 1?"},
                                 {"role": "assistant", "content": "Answer 1."}],
                    "image": str(images / "red_circle_0.png"), "id": "r1"}  # fmt: skip


def test_same_question_about_another_picture_is_another_row(tmp_path):
    """A LLaVA row is one question about one picture: de-duplication and the split's hashes count the picture."""
    rows = [
        {"messages": [{"role": "user", "content": "<image>\nWhat colour?"}], "image": f"/p/{i}.png"} for i in (1, 2)
    ]
    assert data_mod.row_key(rows[0]) != data_mod.row_key(rows[1])
    chat = {"messages": rows[0]["messages"]}
    assert data_mod.row_key(chat) == data_mod.row_key({**chat, "image": None}), "a chat row's key is as before"


def test_demo_split_is_made_once_and_the_same_for_every_call(tmp_path):
    """The study's split of the demo: held-out rows keep their picture, training rows never hold a held-out row,
    and a second prepare reads the same files (same digest)."""
    spec = load_spec(ROOT / "configs" / "llava_demo.yaml")
    first = data_mod.prepare(spec.data, tmp_path / "data")
    again = data_mod.prepare(spec.data, tmp_path / "data")
    assert first.digest == again.digest and first.counts == again.counts
    val = [json.loads(line) for line in first.path("val").read_text().splitlines()]
    train = [json.loads(line) for line in first.path("train").read_text().splitlines()]
    assert all(Path(r["image"]).is_file() and "<image>" in r["messages"][0]["content"] for r in val)
    assert not {data_mod.row_key(r) for r in val} & {data_mod.row_key(r) for r in train}
    general = [json.loads(line) for line in first.path("general_train").read_text().splitlines()]
    assert general and all("image" not in r for r in general), "the second data set is text only"
    assert first.counts["test"] > 0 and first.counts["val"] > 0


def test_validate_renders_a_llava_trial_config(tmp_path, capsys, tiny_llava):
    out = tmp_path / "trial.py"
    assert main(["validate", str(ROOT / "configs" / "llava_demo.yaml"), "--output", str(out)]) == 0
    assert "data checks: 110 rows, not compared (questions about pictures" in capsys.readouterr().out
    text = out.read_text()
    assert "'type': 'xtuner.model.LLaVAModel'" in text
    assert f"'pretrained_pth': '{tiny_llava / 'projector.pth'}'" in text
    assert "sweep.xtuner.llava.llava_dataset" in text and "sweep.xtuner.llava.messages_map_fn" in text
    assert "'visual_encoder_lora': {'type': 'peft.LoraConfig',\n                         'r': 8," in text
