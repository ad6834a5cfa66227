"""`sweep init`: a commented starter spec from an XTuner config, as `xtuner copy-cfg` starts a config to edit.

The base config's own values become the fixed knobs and the centre of a search space (learning rate, epochs,
LoRA rank and alpha, batch size, and the share of general chat when a second data file is given); the probes are
its ``evaluation_inputs``, the template its ``prompt_template``, the model its ``pretrained_model_name_or_path``
unless ``--model`` names one. The data are read and split as `sweep run` would, so a row XTuner-sweep cannot use
fails here, and the split sizes set the validation schedule. The text is checked as a spec before it is written,
in one atomic step, and an existing file is never replaced unless asked.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from objectives.selection import DEFAULT_KEEP
from sweep import atomic
from sweep.errors import SpecError
from sweep.knobs import base_values, check_knob
from sweep.spec import DataSpec, Spec

#: Held-out fractions, unless that would hold out more rows than validation needs (large data sets).
HELD_OUT = 0.1
HELD_OUT_ROWS = 1000
#: Validation points per epoch of the training rows (``eval_every``).
POINTS_PER_EPOCH = 4


@dataclass(frozen=True)
class Starter:
    """What `sweep init` read from the base config, the model folder and the data, before any text is made."""

    base_config: str  # as the spec will name it (a zoo name, or a path relative to the spec)
    source: str  # as the user named it
    knobs: dict[str, Any]
    template: str
    model: str
    model_is_local: bool
    quantize: bool
    trust_remote_code: bool
    probes: list[str]
    system: str
    task: str
    general: str | None
    held_out: float
    train_rows: int
    study: str
    registry: str


def template_name(cfg: dict[str, Any], source: str) -> str:
    """The name in XTuner's PROMPT_TEMPLATE of the template the config trains with."""
    from xtuner.utils import PROMPT_TEMPLATE

    dataset = (cfg.get("train_dataloader") or {}).get("dataset") or {}
    candidates = [cfg.get("prompt_template"), (dataset.get("template_map_fn") or {}).get("template")]
    for found in candidates:
        if isinstance(found, str) and found in PROMPT_TEMPLATE:
            return found
        if isinstance(found, dict):
            for name, template in PROMPT_TEMPLATE.items():
                if dict(template) == dict(found):
                    return name
    raise SpecError(
        f"base_config {source}: its prompt_template is not one of XTuner's PROMPT_TEMPLATE; "
        "pick the name of one (`python -c 'from xtuner.utils import PROMPT_TEMPLATE; print(list(PROMPT_TEMPLATE))'`) "
        "and set model.template to it"
    )


def read(base_config: str, data: list[Path], model: Path | None, out: Path) -> Starter:
    """Everything the starter spec says, read from the config, the model folder and the data files."""
    from sweep import data as data_mod
    from sweep.preflight import needs_remote_code
    from sweep.xtuner.config import load_base_config, resolve_base_config

    if not 1 <= len(data) <= 2:
        raise SpecError(f"--data: give the task file and at most one general-chat file, got {len(data)} files")
    config_file = resolve_base_config(base_config)
    cfg = load_base_config(base_config)
    knobs = base_values(cfg)
    if knobs.get("lora_r") is None:
        raise SpecError(
            f"base_config {base_config}: has no model.lora; xtuner-sweep tunes LoRA adapters "
            "(pick a *_lora_* or *_qlora_* config: `xtuner list-cfg -p qlora`)"
        )
    missing = [k for k in ("lr", "batch_size", "max_length") if knobs.get(k) is None]
    if knobs.get("max_epochs") is None and knobs.get("max_iters") is None:
        missing.append("max_epochs")
    if missing:
        raise SpecError(f"base_config {base_config}: has no value for {missing}; XTuner's configs set them in PART 1")

    llm = (cfg.get("model") or {}).get("llm") or {}
    model_path = str(model) if model is not None else str(llm.get("pretrained_model_name_or_path") or "")
    if not model_path:
        raise SpecError(f"base_config {base_config}: names no pretrained_model_name_or_path; give --model DIR")
    local = Path(model_path).expanduser()
    is_local = (local / "config.json").is_file()
    remote_code = is_local and needs_remote_code(local) and bool(llm.get("trust_remote_code"))

    task, general = data[0], data[1] if len(data) > 1 else None
    rows = len(data_mod.load_rows(task))  # names the file and the row of a row it cannot use
    held_out = HELD_OUT if rows * HELD_OUT <= HELD_OUT_ROWS else round(HELD_OUT_ROWS / rows, 4)
    splits = data_mod.split_rows(DataSpec(task=task, general=general, val=held_out, test=held_out))

    out_dir = Path(os.path.abspath(out)).parent
    is_file = Path(base_config).suffix == ".py" or os.sep in base_config  # resolve_base_config's rule
    evaluation_inputs = cfg.get("evaluation_inputs") or []
    return Starter(
        base_config=_relative(config_file, out_dir) if is_file else base_config,
        source=base_config,
        knobs=knobs,
        template=template_name(cfg, base_config),
        model=_relative(local, out_dir) if is_local else model_path,
        model_is_local=is_local,
        quantize=bool(llm.get("quantization_config")),
        trust_remote_code=remote_code,
        probes=[str(q) for q in evaluation_inputs if str(q).strip()],
        system=str(cfg.get("SYSTEM") or ""),
        task=_relative(task, out_dir),
        general=_relative(general, out_dir) if general else None,
        held_out=held_out,
        train_rows=len(splits["train"]),
        study=_name(task.stem),
        registry=_name(f"{Path(model_path.rstrip('/')).name}-{task.stem}"),
    )


def search_space(s: Starter) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, str]]:
    """The searched knobs (around the base values), the fixed ones (the base values), and a note for each."""
    k = s.knobs
    space: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    lr = float(k["lr"])
    space["lr"] = {"type": "float", "low": _round(lr / 4), "high": _round(min(lr * 4, 1.0)), "log": True}
    notes["lr"] = f"base config: {_number(lr)}"
    if k.get("max_epochs") is not None:
        epochs = int(k["max_epochs"])
        space["max_epochs"] = {"type": "int", "low": 1, "high": max(2, 2 * epochs)}
        notes["max_epochs"] = f"base config: {epochs}"
    batch = int(k["batch_size"])
    space["batch_size"] = {"type": "categorical", "choices": sorted({max(1, batch // 2), batch, 2 * batch})}
    notes["batch_size"] = f"base config: {batch} (per device)"
    rank = int(k["lora_r"])
    space["lora_r"] = {"type": "categorical", "choices": sorted({max(1, rank // 2), rank, 2 * rank})}
    notes["lora_r"] = f"base config: {rank}"
    if k.get("lora_alpha"):
        ratio = float(k["lora_alpha"]) / rank
        choices = sorted({round(ratio / 2, 4), round(ratio, 4), round(ratio * 2, 4)})
        space["lora_alpha_ratio"] = {"type": "categorical", "choices": choices}
        notes["lora_alpha_ratio"] = f"lora_alpha = lora_r * ratio; base config: {k['lora_alpha']} / {rank}"
    if s.general:
        space["mix_ratio"] = {"type": "float", "low": 0.0, "high": 0.3}
        notes["mix_ratio"] = "share of general chat in each trial's training rows"
    fixed = {
        name: k[name]
        for name in ("max_iters", "accumulative_counts", "lora_alpha", "lora_dropout", "max_length")
        if k.get(name) is not None and not (name == "lora_alpha" and "lora_alpha_ratio" in space)
    }
    if "max_epochs" in space:
        fixed.pop("max_iters", None)
    for name, value in fixed.items():
        check_knob(name, value)
    return space, fixed, notes


def render(s: Starter, out: Path) -> str:
    """The starter spec's text, with a comment on every block."""
    space, fixed, notes = search_space(s)
    eval_every = max(1, s.train_rows // POINTS_PER_EPOCH)
    lines = [
        f"# A starter spec, written by `sweep init` from {s.source} on {date.today().isoformat()}.",
        f"# Edit it as you would a config from `xtuner copy-cfg`, then `sweep validate {out.name}` and "
        f"`sweep run {out.name}`.",
        '# Each key is explained in the README ("The spec"); relative paths are relative to this file.',
        f"study: {_y(s.study)}  # the Optuna study and MLflow experiment; `sweep run` again adds trials to it",
        f"base_config: {_y(s.base_config)}  # an XTuner config name (`xtuner list-cfg`) or your own edited config file",
        "model:",
    ]
    where = "the local Hugging Face folder of the base model"
    if not s.model_is_local:
        where = "NOT a local model folder here: point it at your local copy (weights are never downloaded)"
    lines.append(f"  path: {_y(s.model)}  # {where}")
    lines.append(f"  template: {s.template}  # the base config's prompt_template")
    quantize = "QLoRA: the base config loads the model in 4 bits (nf4)" if s.quantize else "LoRA in the model's dtype"
    lines.append(f"  quantize: {_y(s.quantize)}  # {quantize}")
    if s.trust_remote_code:
        lines.append(
            "  trust_remote_code: true  # the model folder ships its own Python code (config.json auto_map) and the "
            "base config trusts it: it runs with your rights"
        )
    if s.system:
        lines.append(f"  # system: {_y(s.system)}")
        lines.append(
            "  #   ^ the base config's SYSTEM, which XTuner's EvaluateChatHook asks with; probes and answers are asked "
            "with model.system (default: none), your data's own system messages train the model"
        )
    lines += [
        "data:",
        f"  task: {_y(s.task)}  # OpenAI `messages` rows, JSONL or a JSON list",
    ]
    if s.general:
        lines.append(f"  general: {_y(s.general)}  # general chat, mixed in against forgetting (mix_ratio)")
    lines += [
        f"  val: {_y(s.held_out)}  # held out: validation picks each trial's best checkpoint and the best trial",
        f"  test: {_y(s.held_out)}  # held out for the test gate only, never for selection",
        "  seed: 0",
    ]
    if fixed:
        lines.append("fixed:  # the base config's own values, not searched")
        lines += [f"  {name}: {_y(value)}" for name, value in fixed.items()]
    lines.append("search_space:  # around the base config's values")
    lines += [f"  {name}: {_y(param)}  # {notes[name]}" for name, param in space.items()]
    lines.append("objective:")
    if s.general:
        lines.append("  metric: val/loss  # or weights: {val/loss: 1.0, val/general_loss: 0.5} to count forgetting too")
    else:
        lines.append("  metric: val/loss  # or val/rouge_l, weights or a Pareto front: see the README")
    lines.append(
        f"  keep: {DEFAULT_KEEP}  # the checkpoint a trial keeps (and is worth): best, better_beyond_noise or "
        "latest_within_noise, each judged with the points' standard errors"
    )
    lines += [
        "sampler: {type: tpe, seed: 0}",
        f"pruner: {{type: median, n_startup_trials: 3, n_warmup_steps: {eval_every}}}  # no pruning before the "
        "second validation point",
        "n_trials: 12",
        f"eval_every: {eval_every}  # training rows between validation points: about {POINTS_PER_EPOCH} per epoch of "
        f"the {s.train_rows} training rows",
        "keep_checkpoints: 1",
    ]
    if s.probes:
        lines.append(
            f"probes: {_y(s.probes)}  # the base config's evaluation_inputs, answered at every validation point"
        )
    lines += [
        "# generation: {max_new_tokens: 64, max_rows: 32}  # also score greedy answers to validation rows "
        "(val/rouge_l); slower",
        f"registry: {{name: {_y(s.registry)}}}  # the Model Registry name; the best adapter gets the alias `champion`",
    ]
    return "\n".join(lines) + "\n"


def write(base_config: str, data: list[Path], model: Path | None, out: Path, force: bool = False) -> Starter:
    """Read, render, check and write the starter spec; nothing is written when any step fails."""
    if out.exists() and not force:
        raise SpecError(f"{out}: exists; name another --out, or pass --force to replace it")
    if not out.parent.is_dir():
        raise SpecError(f"{out}: folder {out.parent} does not exist")
    starter = read(base_config, data, model, out)
    text = render(starter, out)
    try:
        Spec.model_validate(yaml.safe_load(text))
    except (ValidationError, yaml.YAMLError) as err:  # a bug here, not the user's input: show what it made
        raise RuntimeError(f"sweep init made a spec that does not load:\n{err}\n---\n{text}") from err
    atomic.write_text(out, text)
    return starter


def _relative(path: Path, folder: Path) -> str:
    """``path`` as the spec should write it: relative to the spec's folder when close by, else absolute."""
    absolute = Path(os.path.abspath(Path(path).expanduser()))  # not resolve(): keep the user's symlinks
    relative = os.path.relpath(absolute, folder)
    return relative if relative.count("..") <= 2 else str(absolute)


def _name(text: str) -> str:
    """A study or model name: letters, digits, '_', '.', '-' (see sweep.spec)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", text).strip("-._") or "sweep"


def _round(x: float) -> float:
    """Two significant digits: a range that reads as chosen, not computed."""
    return float(f"{x:.2g}") if x else 0.0


def _number(x: float) -> str:
    """A float as YAML 1.1 reads back as a float: PyYAML wants a dot in the mantissa (``5.0e-05``, not ``5e-05``)."""
    text = repr(float(x))
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


PLAIN = re.compile(r"[A-Za-z_./~][A-Za-z0-9_./~\-]*")
YAML_WORDS = {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}


def _y(value: Any) -> str:
    """One value in YAML flow style: the format the README and the demo spec use."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not a finite number: {value}")
        return _number(value)
    if isinstance(value, str):
        plain = PLAIN.fullmatch(value) and value.lower() not in YAML_WORDS
        return value if plain else json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_y(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_y(v) for v in value) + "]"
    return _y(str(value))
