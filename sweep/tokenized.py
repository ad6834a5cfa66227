"""Tokenize a study's training rows once; each trial then only mixes and packs tokens.

Every trial of a study trains on the same task rows plus a share of the same general rows, in the
same template and (unless ``max_length`` is searched) at the same length, so XTuner tokenizing all
of them again in every trial is repeated work: on a GPU it is part of the startup that keeps the
GPU idle. The tokens are made by XTuner's own pipeline from the trial's rendered config (its
tokenizer, template, system prompt and max_length), and the trial's pipeline goes on from them
(filter, shuffle, pack) exactly as after its own tokenizing, so the training data is the same,
token for token (tests/test_tokenized.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from sweep import launcher
from sweep.data import PreparedData
from sweep.render import load_config

SPLITS = ("train", "general_train")
_LOCK = threading.Lock()


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def token_config(config_file: Path) -> dict[str, Any]:
    """The trial's training dataset config, unpacked and unshuffled: what tokenizing depends on."""
    dataset = copy.deepcopy(load_config(config_file).train_dataloader.dataset)
    dataset.pack_to_max_length = False
    dataset.shuffle_before_pack = False
    dataset.use_varlen_attn = False
    return dataset


def tokenize_once(config_file: Path, data: PreparedData) -> Path:
    """The folder of tokenized ``train``/``general_train`` rows for this trial's tokenizing settings.

    Made at most once per settings (thread- and process-safe: written aside, renamed into place).
    """
    dataset = token_config(config_file)
    settings = {k: v for k, v in _plain(dataset).items() if k != "dataset"}
    key = hashlib.sha256(json.dumps([settings, data.digest], sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = data.folder / f"tokens-{key}"
    with _LOCK:
        if (folder / "manifest.json").is_file():
            return folder
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        counts = {}
        for split in SPLITS:
            counts[split] = _tokenize(dataset, data.path(split), tmp / f"{split}.jsonl")
        (tmp / "manifest.json").write_text(json.dumps({"settings": settings, "counts": counts}, default=str, indent=1))
        try:
            tmp.rename(folder)
        except OSError:  # another worker made it first; theirs is the same
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _tokenize(dataset: Any, source: Path, out: Path) -> int:
    from mmengine.registry import DATASETS

    if not source.read_text(encoding="utf-8").strip():
        out.write_text("")
        return 0
    import datasets

    datasets.disable_progress_bars()
    cfg = copy.deepcopy(dataset)
    cfg.dataset.data_files = {"train": str(source)}
    with launcher.same_os_environ():
        built = DATASETS.build(cfg)
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for row in built:
            f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
            n += 1
    return n
