"""The rendered XTuner config: literal values only, the trial's values in the right fields, no code from input."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sweep.knobs import base_values, trial_values
from sweep.spec import SpecError, load_spec
from sweep.trial.protocol import TrialFiles
from sweep.xtuner.config import load_base_config, load_config
from sweep.xtuner.render import Device, render
from tests.conftest import ROOT

INJECT = "__import__('os').system('touch /tmp/xtuner-sweep-pwned')"


@pytest.fixture(scope="module")
def base():
    return load_base_config("internlm2_1_8b_qlora_alpaca_e3")


CPU = Device(cuda=False)


def _render(base, spec, device=CPU, **sampled):
    values = trial_values(spec, sampled, base_values(base))
    files = TrialFiles(Path("/w/train.jsonl"), Path("/w/val.jsonl"), Path("/w"), 100, Path("/w/general_val.jsonl"))
    return render(base, spec, values, files, device)


def _load(text: str) -> dict:
    tree = ast.parse(text)
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body}


def test_every_assignment_is_a_literal_and_knobs_land(base):
    spec = load_spec(ROOT / "configs" / "demo.yaml")
    cfg = _load(
        _render(base, spec, lr=0.005, max_epochs=6, batch_size=8, lora_r=16, lora_alpha_ratio=2.0, mix_ratio=0.1)
    )
    assert cfg["optim_wrapper"]["optimizer"]["lr"] == 0.005
    assert cfg["optim_wrapper"]["type"] == "mmengine.optim.OptimWrapper"  # CPU: no AMP
    assert cfg["train_cfg"]["max_epochs"] == 6
    assert cfg["train_dataloader"]["batch_size"] == 8
    assert cfg["model"]["lora"]["r"] == 16 and cfg["model"]["lora"]["lora_alpha"] == 32
    assert cfg["model"]["llm"]["pretrained_model_name_or_path"] == str(spec.model.path)
    assert "quantization_config" not in cfg["model"]["llm"]
    assert cfg["train_dataloader"]["dataset"]["max_length"] == 64
    assert cfg["val_dataloader"]["dataset"]["pack_to_max_length"] is False
    # the demo's objective is a weighted sum: the best checkpoint and the hook follow it, not val/loss
    assert cfg["default_hooks"]["checkpoint"]["save_best"] == "val/weighted"
    hook = next(h for h in cfg["custom_hooks"] if h["type"] == "sweep.training.hook.SweepHook")
    assert hook["metric"] == "val/weighted" and hook["rule"] == "less"
    assert hook["keep"] == spec.objective.keep == "latest_within_noise", "the hook keeps by the spec's rule"
    other = spec.model_copy(update={"objective": spec.objective.model_copy(update={"keep": "best"})})
    hook = next(h for h in _load(_render(base, other, lr=0.005, max_epochs=6, batch_size=8, lora_r=16,
                                         lora_alpha_ratio=2.0, mix_ratio=0.1))["custom_hooks"]
                if h["type"] == "sweep.training.hook.SweepHook")  # fmt: skip
    assert hook["keep"] == "best"
    assert hook["weights"] == {"val/loss": 1.0, "val/general_loss": 0.5, "val/rouge_l": -2.0}
    general = hook["general_val"]["dataset"]
    assert general["dataset"]["data_files"] == {"train": "/w/general_val.jsonl"} and not general["pack_to_max_length"]
    assert cfg["default_hooks"]["checkpoint"]["max_keep_ckpts"] == spec.keep_checkpoints
    # the base's epoch-based schedule is stretched to the trial's 6 epochs (the base had 3)
    assert cfg["param_scheduler"][-1]["end"] == pytest.approx(6.0)
    assert "alpaca_en" not in cfg, "the base's own dataset is not what the trial trains on"
    assert not any("EvaluateChatHook" in str(h) for h in cfg["custom_hooks"])


def test_gpu_keeps_amp_and_quantization(base):
    spec = load_spec(ROOT / "configs" / "internlm2_chat_1_8b_qlora.yaml")
    cfg = _load(_render(base, spec, device=Device(cuda=True), lr=1e-4, lora_r=64))
    assert cfg["optim_wrapper"]["type"].endswith("AmpOptimWrapper")
    assert cfg["model"]["llm"]["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert cfg["prompt_template"]["INSTRUCTION"].startswith("<|im_start|>user")


def test_values_from_input_never_become_code(base, tmp_path: Path):
    spec = load_spec(ROOT / "configs" / "demo.yaml")
    spec = spec.model_copy(
        update={
            "model": spec.model.model_copy(update={"system": INJECT, "path": Path("/m/" + INJECT)}),
            "probes": [INJECT, "普通的问题"],
        }
    )
    values = trial_values(spec, {"lr": 0.01}, base_values(base))
    files = TrialFiles(Path(f"/w/{INJECT}.jsonl"), Path("/w/val.jsonl"), Path("/w"), 10)
    text = render(base, spec, values, files, Device(cuda=False))
    cfg = _load(text)  # would raise if any right-hand side were not a plain literal
    assert cfg["SYSTEM"] == INJECT
    assert cfg["train_dataloader"]["dataset"]["dataset"]["data_files"]["train"] == f"/w/{INJECT}.jsonl"
    assert cfg["model"]["llm"]["pretrained_model_name_or_path"] == "/m/" + INJECT
    hook = next(h for h in cfg["custom_hooks"] if h["type"] == "sweep.training.hook.SweepHook")
    assert hook["generation"]["probes"] == [INJECT, "普通的问题"]
    assert not Path("/tmp/xtuner-sweep-pwned").exists()


#: Text mmengine's Config.fromfile rewrites before it parses a config: predefined variables, environment
#: variables (plain and quoted) and base-config references.
PLACEHOLDERS = [
    "{{ fileDirname }}", "{{fileBasename}}", "{{ fileBasenameNoExtension }}", "{{ fileExtname }}",
    "{{$HOME:x}}", "{{'$HOME:x'}}", '{{"$XTUNER_SWEEP_UNSET:default"}}', "{{_base_.model}}", "{{{{$HOME:x}}}}",
]  # fmt: skip
#: Two probes whose environment placeholder spans both: at be84680 loading the config ran the second one.
BREAKOUT = ["{{'$A:", '}}__import__("pathlib").Path("/tmp/xtuner-sweep-pwned").touch(),#', "x" * 120]


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_every_free_text_value_reaches_training_exactly(base, tmp_path: Path, placeholder: str):
    """Each string from the spec or the data's paths, loaded the way training loads the config (mmengine's
    Config.fromfile), equals the spec's value: nothing substituted, nothing run."""
    text = f"a {placeholder} b"
    spec = load_spec(ROOT / "configs" / "demo.yaml")
    spec = spec.model_copy(
        update={
            "model": spec.model.model_copy(update={"system": text, "path": tmp_path / f"model {placeholder}"}),
            "probes": [text, *BREAKOUT],
        }
    )
    values = trial_values(spec, {"lr": 0.01}, base_values(base))
    work = tmp_path / f"work {placeholder}"
    files = TrialFiles(work / f"rows {placeholder}.jsonl", tmp_path / f"val {placeholder}.jsonl", work, 10,
                       tmp_path / f"general {placeholder}.jsonl", data_digest=placeholder)  # fmt: skip
    config = tmp_path / "config.py"
    config.write_text(render(base, spec, values, files, CPU), encoding="utf-8")
    cfg = load_config(config)
    assert text == cfg.SYSTEM
    assert cfg.model.llm.pretrained_model_name_or_path == str(spec.model.path)
    assert cfg.tokenizer.pretrained_model_name_or_path == str(spec.model.path)
    assert cfg.train_dataloader.dataset.dataset.data_files.train == str(files.train)
    assert cfg.val_dataloader.dataset.dataset.data_files.train == str(files.val)
    assert cfg.work_dir == str(work)
    hook = next(h for h in cfg.custom_hooks if h["type"] == "sweep.training.hook.SweepHook")
    assert hook["generation"]["probes"] == [text, *BREAKOUT]
    assert hook["generation"]["system"] == text
    assert hook["generation"]["val_file"] == str(files.val)
    assert hook["general_val"]["dataset"]["dataset"]["data_files"]["train"] == str(files.general_val)
    assert hook["stream"] == str(files.stream) and hook["adapter_dir"] == str(files.adapter)
    assert not Path("/tmp/xtuner-sweep-pwned").exists()


def test_unknown_base_config_and_template(base, tmp_path: Path):
    with pytest.raises(SpecError, match="did you mean"):
        load_base_config("internlm2_1_8b_qlora_alpaca_e4")
    with pytest.raises(SpecError, match="not found"):
        load_base_config(str(tmp_path / "mine.py"))
    spec = load_spec(ROOT / "configs" / "demo.yaml")
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"template": "qwen_chatt"})})
    with pytest.raises(SpecError, match="unknown XTuner prompt template 'qwen_chatt'"):
        _render(base, spec)


def test_fixed_iterations_instead_of_epochs(base):
    spec = load_spec(ROOT / "configs" / "demo.yaml")
    spec = spec.model_copy(update={"fixed": {**spec.fixed, "max_iters": 40}})
    cfg = _load(
        _render(base, spec, lr=0.005, max_epochs=6, batch_size=2, lora_r=8, lora_alpha_ratio=1.0, mix_ratio=0.0)
    )
    assert cfg["train_cfg"]["max_iters"] == 40 and "max_epochs" not in cfg["train_cfg"]
    assert all(s["by_epoch"] is False for s in cfg["param_scheduler"])
    assert cfg["param_scheduler"][-1]["end"] == 40, "the schedule keeps its shape over the iterations"


def test_config_text_skips_yapf_and_loads_back_the_same(tmp_path: Path, tiny_model: Path, monkeypatch):
    """What a training process writes out for mmengine (config dump, checkpoint metadata) is plain, not yapf'd."""
    import copy

    from mmengine.config import Config
    from mmengine.config import config as config_module

    from sweep import cli
    from sweep.training import patches
    from tests.conftest import write_spec

    rendered = tmp_path / "trial.py"
    assert cli.main(["validate", str(write_spec(tmp_path, tiny_model)), "--output", str(rendered)]) == 0
    formatted = Config.fromfile(str(rendered)).pretty_text
    monkeypatch.setattr(Config, "__init__", Config.__init__)  # the patch below is undone after the test

    patches._plain_config_text()

    def no_yapf(*args, **kwargs):
        raise AssertionError("yapf formatted the config")

    monkeypatch.setattr(config_module, "FormatCode", no_yapf)
    cfg = Config.fromfile(str(rendered))
    text = cfg.pretty_text
    assert text != formatted, "the text a runner writes is the unformatted one"
    back = tmp_path / "back.py"
    back.write_text(text, encoding="utf-8")
    assert Config.fromfile(str(back)).to_dict() == cfg.to_dict() == Config.fromfile(str(rendered)).to_dict()
    assert copy.deepcopy(cfg).pretty_text == text, "the runner's copies of the config stay plain"


def test_no_pause_between_epochs_of_an_in_process_loader(monkeypatch):
    """mmengine sleeps 2 s at each epoch boundary for its loader's worker processes; without any, it need not."""
    import time

    from mmengine.runner import loops
    from torch.utils.data import DataLoader

    from sweep.training import patches

    monkeypatch.setattr(loops._InfiniteDataloaderIterator, "__next__", loops._InfiniteDataloaderIterator.__next__)
    monkeypatch.setattr(loops, "time", loops.time)  # both patches are undone after the test
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)

    def batches(loader: DataLoader) -> list[int]:
        it = loops._InfiniteDataloaderIterator(loader)
        return [int(next(it)) for _ in range(7)]  # 3 epochs of 3 rows: 2 epoch boundaries

    assert batches(DataLoader(range(3), batch_size=1)) == [0, 1, 2, 0, 1, 2, 0]
    assert slept == [2, 2], "mmengine's own pause, before the patch"
    slept.clear()

    patches._no_pause_between_epochs()
    assert batches(DataLoader(range(3), batch_size=1)) == [0, 1, 2, 0, 1, 2, 0], "the same rows, same order"
    assert slept == []
    assert batches(DataLoader(range(3), batch_size=1, num_workers=1)) == [0, 1, 2, 0, 1, 2, 0]
    assert slept == [2, 2], "loaders with worker processes keep the pause"


class _Garbage:
    """Cyclic garbage with a finalizer: the collector runs Python code, so threads switch mid-parse."""

    def __del__(self):
        sum(range(50))


def _at_depth(depth: int, fn):
    return fn() if depth == 0 else _at_depth(depth - 1, fn)


def test_trials_render_and_load_configs_in_parallel_threads(base, tmp_path: Path):
    """--n-jobs trials render and load configs at once: CPython 3.11 failed one of two such threads with
    "SystemError: AST constructor recursion depth mismatch" (a CI run; render.PARSE_LOCK)."""
    import gc
    import sys
    import threading

    from sweep.xtuner.config import load_config
    from sweep.xtuner.literal import to_source

    spec = load_spec(ROOT / "configs" / "demo.yaml")
    rendered = tmp_path / "trial.py"
    rendered.write_text(_render(base, spec, lr=0.005, max_epochs=2, batch_size=4, lora_r=8, mix_ratio=0.1))
    big = {"rows": [{"q": "x" * 10, "a": [1, 2, {"b": (3, 4)}]} for _ in range(300)]}  # a long parse
    errors: list[BaseException] = []

    def hammer(depth: int, fn) -> None:
        def loop() -> None:
            for _ in range(80):
                for _ in range(100):
                    junk = _Garbage()
                    junk.me = junk
                try:
                    fn()
                except BaseException as err:  # noqa: BLE001 - collected for the assertion
                    errors.append(err)
                    return

        _at_depth(depth, loop)

    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    gc.set_threshold(50)
    sys.setswitchinterval(1e-5)
    try:
        threads = [
            threading.Thread(target=hammer, args=(5, lambda: to_source(big))),
            threading.Thread(target=hammer, args=(40, lambda: load_config(rendered))),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        gc.set_threshold(*threshold)
        sys.setswitchinterval(interval)
    assert not errors, errors
