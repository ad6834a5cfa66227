"""Shared fixtures: the tiny model (built once per checkout) and one small end-to-end sweep.

The sweep fixture trains real XTuner trials on the tiny model against a real SQLite Optuna storage
and a real MLflow store; every end-to-end test reads the same study instead of training its own.
"""

from __future__ import annotations

import importlib.util
import os
import re
import textwrap
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / ".cache" / "tiny-model"


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test` runs ``-n auto``), each test process gets its own share of the CPUs.

    The sweeps it starts plan their CPU threads from this affinity (``placement.usable_cpus``): without it
    each of N test processes would train with every CPU's worth of threads, N times too many.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1 and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= count:
            os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) :: count])


def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadscope``, the units of work that keep a training fixture to one test process, once.

    Every file that uses the end-to-end sweep (``e2e``, session-wide) is one unit, a file with a module-wide fixture
    is a unit, and any other test is a unit of its own. (xdist's ``xdist_group`` marks would say this, but its
    ``loadgroup`` does not group under pytest 9.) Which files are which is read from their text.
    """
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    e2e, module = set(), set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        text, name = path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))
        if re.search(r"def test_\w+\([^)]*\be2e\b", text):
            e2e.add(name)
        elif 'scope="module"' in text:
            module.add(name)

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "e2e" if file in e2e else file if file in module else nodeid

    return Scheduling(config, log)


def _built(folder: Path, made: str, script: str) -> Path:
    """``folder``, built by ``data/SCRIPT``'s ``build`` (as `make setup` builds it) unless ``folder/MADE`` exists."""
    if not (folder / made).exists():
        spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / "data" / script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.build(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return _built(TINY, "config.json", "tiny_model.py")


TINY_LLAVA = ROOT / ".cache" / "tiny-llava"


@pytest.fixture(scope="session")
def tiny_llava() -> Path:
    """The tiny LLaVA parts (llm/, visual_encoder/, projector.pth), built once per checkout as `make setup` does."""
    return _built(TINY_LLAVA, "projector.pth", "tiny_llava.py")


def write_llava_spec(folder: Path, parts: Path, **overrides: str) -> Path:
    """A small LLaVA spec over the bundled pictures (``configs/llava_demo.yaml``'s shape); ``overrides`` replace
    whole top-level YAML blocks, as in ``write_spec``."""
    demo = ROOT / "data" / "llava_demo"
    blocks = {
        "study": "study: llava",
        "base_config": "base_config: llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune",
        "model": f"model: {{path: {parts / 'llm'}, visual_encoder: {parts / 'visual_encoder'}, "
        f"projector: {parts / 'projector.pth'}, template: qwen_chat}}",
        "data": f"data:\n  task: {demo / 'task.json'}\n  images: {demo / 'img'}\n  general: {demo / 'general.json'}\n"
        "  val: 0.15\n  test: 0.15\n  seed: 0",
        "fixed": "fixed: {max_length: 64, max_epochs: 2, batch_size: 8, lora_alpha_ratio: 2.0}",
        "search_space": "search_space:\n  lr: {type: float, low: 1.0e-3, high: 2.0e-2, log: true}",
        "n_trials": "n_trials: 1",
        "eval_every": "eval_every: 48",
        "probes": f"probes: [{{image: {demo / 'img' / 'red_circle_0.png'}, question: 'What colour is the shape?'}}]",
        "generation": "generation: {max_new_tokens: 8, max_rows: 6}",
        "speed": "speed: {activation_checkpointing: 'off'}",
        "registry": "registry: {name: llava-model}",
    }
    blocks.update(overrides)
    path = folder / "spec.yaml"
    path.write_text("\n".join(b for b in blocks.values() if b) + "\n", encoding="utf-8")
    return path


def write_spec(folder: Path, model_dir: Path, **overrides: str) -> Path:
    """A small spec over the bundled data; ``overrides`` replace whole top-level YAML blocks."""
    blocks = {
        "study": "study: e2e",
        "base_config": "base_config: internlm2_1_8b_qlora_alpaca_e3",
        "model": f"model: {{path: {model_dir}, template: qwen_chat}}",
        "data": textwrap.dedent(
            f"""\
            data:
              task: {ROOT / "data/demo/task.jsonl"}
              general: {ROOT / "data/demo/general.jsonl"}
              val: 0.15
              test: 0.1
              seed: 0"""
        ),
        "fixed": "fixed: {max_length: 64, max_epochs: 3, batch_size: 4, accumulative_counts: 1, lora_alpha_ratio: 2.0}",
        "search_space": textwrap.dedent(
            """\
            search_space:
              lr: {type: float, low: 1.0e-6, high: 3.0e-2, log: true}
              lora_r: {type: categorical, choices: [8, 16]}
              mix_ratio: {type: float, low: 0.0, high: 0.3}"""
        ),
        "pruner": "pruner: {type: median, n_startup_trials: 1, n_warmup_steps: 0}",
        "sampler": "sampler: {type: tpe, seed: 0}",
        "n_trials": "n_trials: 4",
        "eval_every": "eval_every: 32",
        "registry": "registry: {name: e2e-model}",
    }
    blocks.update(overrides)
    path = folder / "spec.yaml"
    path.write_text("\n".join(blocks.values()) + "\n", encoding="utf-8")
    return path


def files_below(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def assert_run_refused(tmp_path: Path, monkeypatch, capsys, spec: Path, expected: str) -> str:
    """``sweep run SPEC`` on bad input, from an empty folder below ``tmp_path``: exit code 2, ``expected`` in its one
    error message and no traceback, and nothing created below ``tmp_path``. Returns the message."""
    from sweep.cli import main

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = files_below(tmp_path)
    rc = main(["run", str(spec)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expected in err, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert files_below(tmp_path) == before, "bad input left files behind"
    return err


def inject_into_training(folder: Path, body: str) -> Path:
    """A ``sitecustomize.py`` that runs ``body`` at the start of every training job, with ``argv``
    (xtuner train's arguments, the trial's config path first) in scope; return ``True`` from it to
    train normally. It wraps ``sweep.training.job.train_in_this_process``, which a fresh training
    process and a resident worker both call once per job. Put ``folder`` on PYTHONPATH.
    """
    folder.mkdir(parents=True, exist_ok=True)
    indented = textwrap.indent(textwrap.dedent(body), "    ")
    (folder / "sitecustomize.py").write_text(
        "import sweep.training.job as _launcher\n"
        "_original = _launcher.train_in_this_process\n\n\n"
        "def _injected(argv):\n"
        f"{indented}\n"
        "    return _original(argv)\n\n\n"
        "_launcher.train_in_this_process = _injected\n"
    )
    return folder


# Test-only: make one trial's training crash the way a real bug would.
FAIL_HOOK = """\
if any("trial_0001" in a for a in argv):
    import traceback

    try:
        raise RuntimeError("injected training failure for the test")
    except RuntimeError:
        traceback.print_exc()
    raise SystemExit(1)
"""


@pytest.fixture(scope="session")
def e2e(tmp_path_factory, tiny_model):
    """One sweep: trial 0 learns, trial 1 crashes, trial 2 barely learns (pruned), trial 3; then a second run."""
    import optuna

    from sweep import study as study_mod
    from sweep.spec import load_spec

    ws = tmp_path_factory.mktemp("e2e")
    inject = inject_into_training(ws / "inject", FAIL_HOOK)
    probes = 'n_trials: 4\nprobes: ["Who are you?", "你是谁？"]\ngeneration: {max_new_tokens: 8, max_rows: 4}'
    spec = load_spec(write_spec(ws, tiny_model, n_trials=probes))
    opts = study_mod.RunOptions(
        storage=f"sqlite:///{ws / 'sweep.db'}", tracking_uri=f"sqlite:///{ws / 'mlflow.db'}", work_dir=ws / "runs"
    )
    st = study_mod.open_study(spec, opts.storage)
    st.enqueue_trial({"lr": 1e-2, "lora_r": 16, "mix_ratio": 0.2})
    st.enqueue_trial({"lr": 3e-3, "lora_r": 8, "mix_ratio": 0.1})
    st.enqueue_trial({"lr": 1e-6, "lora_r": 8, "mix_ratio": 0.0})
    st.enqueue_trial({"lr": 5e-3, "lora_r": 16, "mix_ratio": 0.1})
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{inject}{os.pathsep}{old}" if old else str(inject)
    try:
        first = study_mod.run(spec, opts)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    trials_after_first = len(optuna.load_study(study_name="e2e", storage=opts.storage).trials)
    second = study_mod.run(spec, study_mod.RunOptions(**{**opts.__dict__, "n_trials": 1}))
    return {
        "ws": ws,
        "spec": spec,
        "opts": opts,
        "first": first,
        "second": second,
        "trials_after_first": trials_after_first,
        "study": optuna.load_study(study_name="e2e", storage=opts.storage),
    }


def pg_database() -> str:
    """A new, empty database on the machine's PostgreSQL (trust auth), or the test skipped where none runs."""
    psycopg = pytest.importorskip("psycopg")
    name = f"xts_{uuid.uuid4().hex[:10]}"
    try:
        conn = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True)
    except psycopg.OperationalError as err:
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is not running ({err}); .ci/run starts it")
    conn.cursor().execute(f"CREATE DATABASE {name}")
    conn.close()
    return name
