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
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from sweep import atomic
from sweep.data import MANIFEST, PreparedData, file_sha256
from sweep.spec import SpecError
from sweep.xtuner import maps
from sweep.xtuner.config import load_config

log = logging.getLogger("sweep")
SPLITS = ("train", "general_train")
_LOCK = threading.Lock()
_CHECKED: set[Path] = set()  # folders whose files this process has checked against their manifest


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

    Made at most once per settings and process; workers in other processes (even ones with the same
    PID) each write into a folder of their own beside it and the first rename wins, so no writer
    removes or renames another's folder. Its files are checked against the manifest's hashes once
    per process before they are used.
    """
    dataset = token_config(config_file)
    settings = {k: v for k, v in _plain(dataset).items() if k != "dataset"}
    key = hashlib.sha256(json.dumps([settings, data.digest], sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = data.folder / f"tokens-{key}"
    with _LOCK:
        if folder in _CHECKED:
            return folder
        if not folder.exists():
            tmp = atomic.temp_dir_beside(folder)
            try:
                counts, hashes = {}, {}
                for split in SPLITS:
                    out = tmp / f"{split}.jsonl"
                    counts[split] = _tokenize(dataset, data.path(split), out)
                    hashes[split] = file_sha256(out)
                manifest = {"settings": settings, "counts": counts, "hashes": hashes}
                (tmp / MANIFEST).write_text(json.dumps(manifest, default=str, indent=1))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            atomic.publish_dir(tmp, folder)  # False: another worker's folder is there; it is checked below
        _check(folder)
        _CHECKED.add(folder)
    return folder


def _check(folder: Path) -> None:
    """Refuse a tokens folder whose manifest is missing or whose files do not have the manifest's hashes."""
    again = f"delete the folder (rm -r {folder}) and run again: it is made again from the study's data split"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise SpecError(f"{folder}: has no {MANIFEST}, so it is not a finished tokens folder; {again}") from None
    except json.JSONDecodeError as err:
        raise SpecError(f"{folder / MANIFEST}: not valid JSON ({err}); {again}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("hashes", {}), dict):
        raise SpecError(f"{folder / MANIFEST}: expected an object with the files' hashes; {again}")
    hashes = manifest.get("hashes")
    if hashes is None:  # made before manifests held hashes: used as it was then, unchecked
        log.warning("%s: made by an older xtuner-sweep, without file hashes; used unchecked", folder)
        return
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        found = file_sha256(path) if path.is_file() else "missing"
        if found != hashes.get(split):
            raise SpecError(f"{path}: sha256 {found}, but {MANIFEST} says {hashes.get(split)}; {again}")


def _tokenize(dataset: Any, source: Path, out: Path) -> int:
    from mmengine.registry import DATASETS

    if not source.read_text(encoding="utf-8").strip():
        out.write_text("")
        return 0
    import datasets

    datasets.disable_progress_bars()
    cfg = copy.deepcopy(dataset)
    cfg.dataset.data_files = {"train": str(source)}
    with maps.built_here():
        built = DATASETS.build(cfg)
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for row in built:
            f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
            n += 1
    return n
