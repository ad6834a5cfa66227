"""The LLaVA demo end to end: real XTuner LLaVA training on the tiny parts, real SQLite Optuna and MLflow stores.

One study runs ``configs/llava_demo.yaml`` with a test-sized budget (two enqueued trials: one that learns, one
that barely does and is pruned); every test reads it. What it must show: validation on held-out picture questions
(step-0 baseline, val/loss, val/rouge_l from answers generated with the picture), the probes' answer table with
the pictures in MLflow, the best checkpoint kept in ``xtuner convert pth_to_hf``'s layout, and the test gate's
champion beating the untrained model on test/loss and test/rouge_l, as ``sweep report`` shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

GOOD = {"lr": 1.0e-2, "max_epochs": 2, "batch_size": 8, "lora_r": 16, "mix_ratio": 0.1}
POOR = {"lr": 1.0e-3, "max_epochs": 2, "batch_size": 8, "lora_r": 8, "mix_ratio": 0.1}


@pytest.fixture(scope="module")
def llava(tmp_path_factory, tiny_llava):
    import optuna

    from sweep import study as study_mod
    from sweep.spec import PrunerSpec, load_spec

    ws = tmp_path_factory.mktemp("llava")
    spec = load_spec(ROOT / "configs" / "llava_demo.yaml")
    # the demo as it is, with a test's budget: 2 trials, and the pruner free to stop the second at its first point
    spec = spec.model_copy(update={"n_trials": 2, "pruner": PrunerSpec(type="median", n_startup_trials=1)})
    opts = study_mod.RunOptions(
        storage=f"sqlite:///{ws / 'sweep.db'}", tracking_uri=f"sqlite:///{ws / 'mlflow.db'}", work_dir=ws / "runs"
    )
    st = study_mod.open_study(spec, opts.storage)
    st.enqueue_trial(GOOD)
    st.enqueue_trial(POOR)
    report = study_mod.run(spec, opts)
    return {"ws": ws, "spec": spec, "opts": opts, "report": report,
            "study": optuna.load_study(study_name=spec.study, storage=opts.storage)}  # fmt: skip


def _events(trial) -> list:
    from sweep.trial import protocol

    return list(protocol.EventReader(Path(trial.user_attrs["work_dir"]) / protocol.STREAM_FILE).read())


def test_trials_validate_on_picture_questions_from_step_0(llava):
    import optuna

    trials = llava["study"].trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    from sweep.trial import protocol

    vals = [e for e in _events(trials[0]) if isinstance(e, protocol.Val)]
    assert vals[0].step == 0 and {"val/loss", "val/rouge_l", "val/general_loss"} <= set(vals[0].metrics)
    assert vals[-1].metrics["val/loss"] < vals[0].metrics["val/loss"] / 2, "the trial learned the answers"
    assert vals[-1].metrics["val/rouge_l"] > vals[0].metrics["val/rouge_l"]
    answers = [e for e in _events(trials[0]) if isinstance(e, protocol.ValAnswers)][-1].rows
    assert len(answers) == 12 and all(Path(r["image"]).is_file() for r in answers), "each answer names its picture"


def test_probe_answers_are_logged_with_their_pictures(llava, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(llava["opts"].tracking_uri)
    run_id = llava["study"].trials[0].user_attrs["mlflow_run_id"]
    local = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    table = json.loads((local / "samples.json").read_text())
    image = table["columns"].index("image")
    assert {row[table["columns"].index("question")] for row in table["data"]} == {"What colour is the shape?",
                                                                                  "图中是什么形状？"}  # fmt: skip
    pictures = [row[image] for row in table["data"]]
    assert pictures and all(p["type"] == "image" and (local / p["filepath"]).is_file() for p in pictures)
    assert {0} < {row[table["columns"].index("step")] for row in table["data"]}, "from the untrained step 0 on"


def test_best_checkpoint_is_what_xtuner_convert_writes(llava, tmp_path):
    """The kept folder holds what ``xtuner convert pth_to_hf --fp32`` writes from the best .pth, tensor for tensor."""
    from safetensors.torch import load_file

    trial = llava["study"].trials[0]
    work = Path(trial.user_attrs["work_dir"])
    kept = Path(trial.user_attrs["adapter_path"])
    assert {p.name for p in kept.iterdir()} >= {"llm_adapter", "visual_encoder_adapter", "projector"}
    best_pth = next(work.glob("best_val_loss_iter_*.pth"))
    out = tmp_path / "converted"
    code = "from sweep.training import patches; patches.prepare_process(); from xtuner.tools.model_converters " \
           "import pth_to_hf; import sys; sys.argv[1:] = sys.argv[1:]; pth_to_hf.main()"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(kept / "xtuner_config.py"), str(best_pth), str(out),
                           "--fp32", "--safe-serialization"], capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for part in ("llm_adapter", "visual_encoder_adapter", "projector"):
        ours = {p.name for p in (kept / part).iterdir()}
        theirs = {p.name for p in (out / part).iterdir()}
        assert theirs <= ours, (part, theirs - ours)
        weights = next(n for n in theirs if n.endswith(".safetensors"))
        a, b = load_file(kept / part / weights), load_file(out / part / weights)
        assert a.keys() == b.keys() and all((a[k].float() - b[k].float()).abs().max() < 1e-6 for k in a), part


def test_champion_beats_the_untrained_model_on_the_test_split(llava, capsys):
    from sweep.cli import main

    reg = llava["report"]["registered"]
    test, untrained = reg["test"], reg["untrained_test"]
    assert reg["alias"] == "champion"
    assert test["test/loss"] < untrained["test/loss"]
    assert test["test/rouge_l"] > untrained["test/rouge_l"]
    opts = llava["opts"]
    rc = main(["report", llava["spec"].study, "--storage", opts.storage, "--tracking-uri", opts.tracking_uri,
               "--no-plots"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert f"test/loss {test['test/loss']:.4f} (untrained {untrained['test/loss']:.4f})" in out, out
    assert f"test/rouge_l {test['test/rouge_l']:.4f} (untrained {untrained['test/rouge_l']:.4f})" in out, out


def test_registered_champion_answers_rows_of_image_and_question(llava):
    """The pyfunc champion takes rows of image (a file, or its bytes) + question, and answers as the sweep scored:
    the same greedy answers for the same picture however it is given."""
    import mlflow
    import pandas as pd

    uri = llava["opts"].tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    champion = mlflow.pyfunc.load_model("models:/demo-llava@champion")
    picture = ROOT / "data" / "llava_demo" / "img" / "green_square_2.png"
    rows = pd.DataFrame({"image": [str(picture), str(picture)], "question": ["What shape is in the picture?",
                                                                             "图中的形状是什么颜色？"]})  # fmt: skip
    answers = champion.predict(rows)
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers), answers
    as_bytes = champion.predict([{"image": picture.read_bytes(), "question": "What shape is in the picture?"}])
    assert as_bytes == answers[:1]


def test_chat_with_an_image_and_export_of_the_llava_checkpoint(llava, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    from sweep.cli import main

    opts = llava["opts"]
    stores = ["--storage", opts.storage, "--tracking-uri", opts.tracking_uri]
    picture = ROOT / "data" / "llava_demo" / "img" / "green_square_2.png"
    question = "What shape is in the picture?"
    assert main(["chat", "models:/demo-llava@champion", "--image", str(picture), "--question", question, *stores]) == 0
    from_registry = capsys.readouterr().out.strip()
    assert main(["chat", llava["spec"].study, "--image", str(picture), "--question", question, *stores]) == 0
    assert capsys.readouterr().out.strip() == from_registry != "", "the study's best trial is the champion"
    assert main(["chat", llava["spec"].study, "--image", str(tmp_path / "none.png"), "--question", "?", *stores]) == 2
    assert "--image: image" in capsys.readouterr().err

    adapter, merged = tmp_path / "checkpoint", tmp_path / "merged"
    assert (
        main(["export", "models:/demo-llava@champion", "--adapter", str(adapter), "--merge", str(merged), *stores]) == 0
    )
    assert {p.name for p in adapter.iterdir()} >= {"llm_adapter", "visual_encoder_adapter", "projector"}
    assert {p.name for p in merged.iterdir()} == {"llm", "visual_encoder", "projector"}
    AutoModelForCausalLM.from_pretrained(merged / "llm")
    CLIPVisionModel.from_pretrained(merged / "visual_encoder")
    assert (merged / "visual_encoder" / "preprocessor_config.json").is_file()
