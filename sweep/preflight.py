"""Every check that can fail before training, run before anything is created.

The spec, the data rows (and rows that contradict one another: ``conflicts``), the model folder, the base
config and one rendered config: a typo costs a second here instead of a half-made study, MLflow run or work
dir (and an hour of GPU time) later.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objectives import group_of, lookup
from sweep import conflicts, groups, speed
from sweep import data as data_mod
from sweep.knobs import base_values, trial_values
from sweep.search import first_point
from sweep.spec import Spec, SpecError
from sweep.trial.protocol import TrialFiles
from sweep.xtuner.config import load_base_config, prompt_template
from sweep.xtuner.render import Device, render

log = logging.getLogger("sweep")


@dataclass
class Checked:
    """What `check` proved usable, so `run` needs no second look."""

    spec: Spec
    base_cfg: dict[str, Any]
    base_knobs: dict[str, Any]
    splits: dict[str, list]
    config_text: str
    findings: conflicts.Findings  # conflicting rows, duplicates, leakage (counted for the study's MLflow run)


def check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise SpecError(f"model.path: {path} is not a directory; name the local folder of the base model")
    if not (path / "config.json").is_file():
        raise SpecError(f"model.path: {path} has no config.json; expected a Hugging Face model folder")
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((path / f).is_file() for f in tokenizer_files):
        raise SpecError(f"model.path: {path} has no tokenizer (none of {list(tokenizer_files)})")


def needs_remote_code(model_dir: Path) -> bool:
    """Whether a model folder's config asks Transformers to import Python code the folder ships (``auto_map``)."""
    try:
        return "auto_map" in json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def check_speed(spec: Spec, device: Device | None) -> None:
    """A speed setting this machine cannot run fails here, not in the first trial's first step."""
    impl = spec.speed.fused_loss
    if impl in speed.FUSED_LOSS_PACKAGES:
        module, package = speed.FUSED_LOSS_PACKAGES[impl]
        if device is not None and not device.cuda:
            raise SpecError(f"speed.fused_loss: {impl} runs on CUDA GPUs only; on this machine use chunked or off")
        if not speed.installed(module):
            raise SpecError(f"speed.fused_loss: {impl} needs the package {package} (pip install {package})")
    if spec.speed.fused_kernels == "on":
        module, package = speed.FUSED_KERNELS_PACKAGE
        if device is not None and not device.cuda:
            raise SpecError("speed.fused_kernels: on runs Triton kernels, on CUDA GPUs only; on this machine use off")
        if not speed.installed(module):
            raise SpecError(f"speed.fused_kernels: on needs the package {package} (pip install {package})")
    if impl not in ("off", "auto") and (key := speed.scales_logits(spec.model.path)):
        raise SpecError(
            f"speed.fused_loss: {impl} cannot be used with {spec.model.path}: its config.json sets {key}, which "
            "rescales or caps the logits; use off or auto"
        )


def check_packing(spec: Spec, base_cfg: dict[str, Any]) -> None:
    """A config that asks for packed rows not to attend to each other gets that, or an error.

    XTuner packs rows into ``max_length``; with ``use_varlen_attn: False`` a packed row is one sequence (its
    samples attend to the ones before them). With ``True`` it needs flash-attn 2: without it XTuner keeps its
    stock attention silently, and the samples still attend across their boundaries.
    """
    model = base_cfg.get("model") if isinstance(base_cfg.get("model"), dict) else {}
    if not (base_cfg.get("use_varlen_attn") or model.get("use_varlen_attn")):
        return
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        raise SpecError(
            f"base_config {spec.base_config}: use_varlen_attn is True, but flash-attn 2 is not installed here; XTuner "
            "would silently let packed samples attend to each other. Install flash-attn or set use_varlen_attn = False"
        )


def check(spec: Spec, device: Device | None = None) -> Checked:
    """Every check that can fail before training, with nothing written anywhere."""
    check_model_dir(spec.model.path)
    if needs_remote_code(spec.model.path) and not spec.model.trust_remote_code:
        raise SpecError(
            f"model.path: {spec.model.path} ships its own modeling code (config.json auto_map, as InternLM2 does); "
            "set model.trust_remote_code: true if you trust that folder"
        )
    prompt_template(spec.model.template)
    if spec.multimodal:
        check_llava_parts(spec)
    check_speed(spec, device)
    data_files = data_mod.read_files(spec.data)
    splits = data_mod.split_rows(spec.data, data_files)
    if not splits["val"]:
        raise SpecError(f"{spec.data.task}: the validation split is empty")
    findings = check_conflicts(spec, data_files, splits)
    base_cfg = load_base_config(spec.base_config)
    check_packing(spec, base_cfg)
    knobs = base_values(base_cfg)
    values = trial_values(spec, first_point(spec), knobs)
    if float(values.get("mix_ratio") or 0) > 0 and not splits["general_train"]:
        raise SpecError("mix_ratio: general data is mixed in but data.general is not set")
    if "val/general_loss" in spec.objective.components and not splits["general_val"]:
        raise SpecError(
            "objective: val/general_loss needs held-out general rows; set data.general and data.general_val > 0"
        )
    check_groups(spec, splits)
    probe = Path("/nonexistent/xtuner-sweep-check")
    general_val = probe / "general_val.jsonl" if splits["general_val"] else None
    files = TrialFiles(probe / "train.jsonl", probe / "val.jsonl", probe, max(1, len(splits["train"])), general_val,
                       groups=tuple(groups.names(splits["val"])))  # fmt: skip
    text = render(base_cfg, spec, values, files, device or Device(cuda=False))
    return Checked(spec, base_cfg, knobs, splits, text, findings)


def check_llava_parts(spec: Spec) -> None:
    """A LLaVA spec's vision tower (a Hugging Face folder with its image processor), projector and probe pictures."""
    from sweep.llava_data import check_image

    tower = spec.model.visual_encoder
    if not (tower.is_dir() and (tower / "config.json").is_file()):
        raise SpecError(f"model.visual_encoder: {tower} is not a Hugging Face model folder (no config.json)")
    if not (tower / "preprocessor_config.json").is_file():
        raise SpecError(f"model.visual_encoder: {tower} has no preprocessor_config.json (its CLIPImageProcessor)")
    if spec.model.projector is not None and not spec.model.projector.exists():
        raise SpecError(f"model.projector: {spec.model.projector} not found; expected the stage-1 iter_N.pth")
    for i, probe in enumerate(spec.probes):
        check_image(probe.image.name, probe.image.parent, f"probes[{i}]")


def check_conflicts(
    spec: Spec, files: dict[Path, data_mod.DataFile], splits: dict[str, list[dict[str, Any]]]
) -> conflicts.Findings:
    """Conflicts and duplicates across the data files, leakage in the study's split: logged, or with
    ``data.conflicts: error`` a SpecError naming the first ones. Exact duplicates are only ever counted.

    LLaVA rows are not compared: one question ("What colour is it?") has as many right answers as pictures."""
    if spec.multimodal:
        return conflicts.Findings(rows=sum(len(f.rows) for f in files.values()), compared=False)
    found = conflicts.find(files, splits)
    if found.problems and spec.data.conflicts == "error":
        raise SpecError(
            f"data.conflicts is error, and {found.problem_text()}:\n"
            + "\n".join(found.lines(limit=3, duplicates=False))
            + f"\n`sweep validate` lists up to {conflicts.LIMIT} of each; data.conflicts: warn trains anyway"
        )
    if found.problems:
        first = found.conflicts[0] if found.conflicts else found.leaks[0]
        a, b = (first.a, first.b) if isinstance(first, conflicts.Conflict) else (first.held_out, first.trained)
        log.warning(
            "data: %s (first: %s and %s); `sweep validate` lists them, data.conflicts: error refuses them",
            found.problem_text(), a.where, b.where,
        )  # fmt: skip
    if found.n_duplicates:
        log.info(
            "data: %d row(s) repeat another row word for word (%d distinct rows); the split keeps one copy of "
            "each row of a file, so repeating a row does not weight it",
            found.n_duplicates, found.n_duplicate_groups,
        )  # fmt: skip
    return found


def check_groups(spec: Spec, splits: dict[str, list]) -> None:
    """A metric of one group (``val/loss/identity``) needs validation rows of that group, answered ones for an answer
    metric, and test rows of it when the test gate compares that group's test twin."""
    from sweep.registry.gate import gate_metric
    from sweep.spec import GenerationSpec

    row_groups = [r.get(groups.KEY) for r in splits["val"]]
    val_groups = groups.names(splits["val"])
    max_rows = (spec.generation or GenerationSpec()).max_rows
    answered = {row_groups[i] for i in groups.answered_rows(row_groups, max_rows)}
    for name in spec.objective.measured:
        group = group_of(name)
        if group is None:
            continue
        if group not in val_groups:
            raise SpecError(f"objective: {name} needs validation rows of group {group!r}; the validation rows carry "
                            f"{', '.join(val_groups) or 'no group'}")  # fmt: skip
        if lookup(name).answers and group not in answered:
            raise SpecError(f"generation.max_rows: the {max_rows} answered validation rows hold none of group "
                            f"{group!r}, which {name} needs; raise it to {len(set(row_groups))} at least")  # fmt: skip
    test_metric, _ = gate_metric(spec.objective)
    group = test_metric.rpartition("/")[2] if test_metric.count("/") > 1 else None
    if splits["test"] and group is not None and group not in groups.names(splits["test"]):
        raise SpecError(f"data.test: the test gate compares {test_metric}, but no test row has group {group!r}")


def detect_device() -> Device:
    import torch

    if torch.cuda.is_available():
        return Device(cuda=True, n_gpus=torch.cuda.device_count())
    return Device(cuda=False)
