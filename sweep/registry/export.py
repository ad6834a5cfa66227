"""The chosen adapter out of the sweep: copied, merged into the base model, or chatted with.

A source is a study name (its best trial, the one `sweep promote` would offer) or a registry URI
such as ``models:/NAME@champion`` (the adapter and template stored with that version, so it works
on a machine that never saw the study). Either way it resolves to an adapter folder, a base model
folder and the prompt template the adapter was trained with.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sweep import atomic
from sweep.spec import SpecError
from sweep.trial import launcher, protocol

log = logging.getLogger("sweep")


@dataclass
class Resolved:
    label: str
    adapter: Path
    base_model: Path
    template: dict[str, Any]
    system: str = ""
    max_new_tokens: int = 64
    quantize: bool = False
    cpu_amp: bool = False  # trained in bf16 on the CPU: loaded in bf16 there too (scoring.inference_dtype)
    trust_remote_code: bool = False  # a study: its spec's choice; a registry URI: only the user's --trust-remote-code
    visual_encoder: Path | None = None  # a LLaVA model: its vision tower; ``adapter`` is then its checkpoint folder
    square: bool = True  # a LLaVA model: pictures padded to a square, as its training loaders did


def resolve(source: str, storage: str, tracking_uri: str, scratch: Path, trust_remote_code: bool = False) -> Resolved:
    """Find the adapter, base model and template behind a study name or a ``models:/`` URI.

    A registered model's remote code runs only with ``trust_remote_code`` (the user's flag): anyone who can
    write the registry could have put it there. A study's own spec decides for its own model.
    """
    if source.startswith("models:/"):
        resolved = _from_registry(source, tracking_uri, scratch)
        if resolved.trust_remote_code and not trust_remote_code:
            raise SpecError(
                f"{source}: its base model runs code of its own; pass --trust-remote-code if you trust its source"
            )
        resolved.trust_remote_code = trust_remote_code
        return resolved
    resolved = _from_study(source, storage, tracking_uri, scratch)
    resolved.trust_remote_code = resolved.trust_remote_code or trust_remote_code  # a study run before the key
    return resolved


def _from_registry(uri: str, tracking_uri: str, scratch: Path) -> Resolved:
    from sweep.registry.tracking import Tracker, redact

    try:
        local = Tracker(tracking_uri).download(uri, scratch)
    except Exception as err:  # noqa: BLE001 - MLflow raises several types for "no such model/alias"
        raise SpecError(f"{uri}: not found in the registry at {redact(tracking_uri)} ({_first_line(err)})") from None
    meta = yaml.safe_load((local / "MLmodel").read_text())
    flavor = meta.get("flavors", {}).get("python_function", {})
    config = flavor.get("config") or flavor.get("model_config") or {}  # MLmodel's key for pyfunc's model_config
    if "llava" in config:
        return _llava_from_registry(uri, local, config)
    adapters = sorted(p.parent for p in local.rglob("adapter_config.json"))
    if not adapters or "template" not in config:
        raise SpecError(f"{uri}: not a model registered by xtuner-sweep (no adapter or template in it)")
    bundled = next((p for p in local.rglob("config.json") if p.parent.name == "base_model"), None)
    base = bundled.parent if bundled else Path(config.get("base_model_path", ""))
    if not (base / "config.json").is_file():
        raise SpecError(f"{uri}: its base model folder {base} is not on this machine")
    return Resolved(uri, adapters[0], base, config["template"], config.get("system", ""),
                    int(config.get("max_new_tokens", 64)), cpu_amp=bool(config.get("cpu_amp")),
                    trust_remote_code=bool(config.get("needs_remote_code")))  # fmt: skip


def _llava_from_registry(uri: str, local: Path, config: dict[str, Any]) -> Resolved:
    """A registered LLaVA model: its checkpoint folder (the one with ``projector/``), LLM and vision tower."""
    from sweep.xtuner.llava import PROJECTOR

    checkpoints = sorted(p.parent.parent for p in local.rglob("config.json") if p.parent.name == PROJECTOR)
    if not checkpoints:
        raise SpecError(f"{uri}: a LLaVA model without its checkpoint folder (projector/) in the registry")
    found = {p.parent.name: p.parent for p in local.rglob("config.json")}
    llm = found.get("base_model") or Path(config.get("base_model_path", ""))
    tower = found.get("visual_encoder") or Path(config.get("visual_encoder_path", ""))
    for what, folder in (("base model", llm), ("vision tower", tower)):
        if not (folder / "config.json").is_file():
            raise SpecError(f"{uri}: its {what} folder {folder} is not on this machine")
    return Resolved(uri, checkpoints[0], llm, config["template"], config.get("system", ""),
                    int(config.get("max_new_tokens", 64)), cpu_amp=bool(config.get("cpu_amp")),
                    trust_remote_code=bool(config.get("needs_remote_code")), visual_encoder=tower,
                    square=bool(config["llava"].get("square", True)))  # fmt: skip


def _from_study(name: str, storage: str, tracking_uri: str, scratch: Path) -> Resolved:
    import optuna

    from sweep.ranking import best_trial
    from sweep.registry.tracking import Tracker, redact
    from sweep.spec import stored_spec
    from sweep.storage import refuse_missing_sqlite
    from sweep.xtuner.config import prompt_template

    refuse_missing_sqlite(storage)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise SpecError(f"storage {redact(storage)}: no study named {name!r} (or give models:/NAME@ALIAS)") from None
    spec = stored_spec(study)
    best = best_trial(study)
    if best is None:
        raise SpecError(f"study {name}: no completed trial yet")
    adapter = Path(best.user_attrs.get("adapter_path", ""))
    marker = "projector/config.json" if spec.multimodal else "adapter_config.json"  # LLaVA: a checkpoint folder
    if not (adapter / marker).is_file():  # removed by keep_adapters: MLflow still has it
        run_id = best.user_attrs.get("mlflow_run_id")
        adapter = Path(Tracker(tracking_uri).client.download_artifacts(run_id, "best_adapter", str(scratch)))
    gen = spec.generation
    square = True
    if spec.multimodal and (adapter / "xtuner_config.py").is_file():
        from sweep.xtuner.llava import pads_to_square

        square = pads_to_square(adapter / "xtuner_config.py")
    return Resolved(
        f"study {name} trial {best.number}", adapter, spec.model.path, prompt_template(spec.model.template),
        spec.model.system, gen.max_new_tokens if gen else 64, spec.model.quantize, spec.cpu_amp,
        spec.model.trust_remote_code, spec.model.visual_encoder, square,
    )  # fmt: skip


def export(resolved: Resolved, adapter_out: Path | None, merge_out: Path | None) -> list[Path]:
    """Copy the adapter and/or write the merged model; refuses to write into a non-empty folder."""

    for out in (adapter_out, merge_out):
        if out is not None and out.exists() and any(out.iterdir()):
            raise SpecError(f"{out}: exists and is not empty; name a new folder")
    written = []
    if adapter_out is not None:
        tmp = atomic.temp_dir_beside(adapter_out)
        shutil.copytree(resolved.adapter, tmp, dirs_exist_ok=True)
        if not atomic.publish_dir(tmp, adapter_out):  # an empty folder is replaced
            raise SpecError(f"{adapter_out}: was filled by another writer during the export; name a new folder")
        written.append(adapter_out)
    if merge_out is not None:
        from sweep.preflight import needs_remote_code

        if not resolved.trust_remote_code and needs_remote_code(resolved.base_model):
            raise SpecError(  # XTuner's merge loads every model with trust_remote_code=True
                f"{resolved.base_model}: this base model runs code of its own; pass --trust-remote-code to merge it"
            )
        if merge_out.exists():
            merge_out.rmdir()
        if resolved.visual_encoder is not None:
            merge_llava(resolved, merge_out)
        else:
            merge_adapter(resolved.base_model, resolved.adapter, merge_out)
        written.append(merge_out)
    return written


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def merge_llava(resolved: Resolved, out: Path) -> None:
    """A LLaVA checkpoint merged as the XTuner tutorial merges one: ``llm/`` (the LLM with its adapter folded in,
    ``xtuner convert merge``), ``visual_encoder/`` (the tower, with its adapter folded in by ``--is-clip`` when it
    has one) and ``projector/``; written beside ``out`` and renamed into place."""
    from sweep.xtuner.llava import LLM_ADAPTER, PROJECTOR, VISUAL_ADAPTER

    tmp = atomic.temp_dir_beside(out)
    try:
        merge_adapter(resolved.base_model, resolved.adapter / LLM_ADAPTER, tmp / "llm")
        if (resolved.adapter / VISUAL_ADAPTER).is_dir():
            merge_adapter(resolved.visual_encoder, resolved.adapter / VISUAL_ADAPTER, tmp / "visual_encoder", clip=True)
        else:
            shutil.copytree(resolved.visual_encoder, tmp / "visual_encoder")
        shutil.copytree(resolved.adapter / PROJECTOR, tmp / "projector")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not atomic.publish_dir(tmp, out):
        raise FileExistsError(f"{out}: was filled by another writer while the merge ran; the merged model was not kept")


def merge_adapter(base_model: Path, adapter: Path, out: Path, clip: bool = False) -> None:
    """``xtuner convert merge``: the adapter folded into the base weights, saved as a Hugging Face model.

    Run as XTuner's own module in a child process (it parses sys.argv and may load the model onto a
    GPU); the merged model is written next to ``out`` and renamed into place, so a failure never
    leaves half a model where the user asked for one.
    """
    import torch

    tmp = atomic.temp_dir_beside(out)  # unique: two merges to one place never remove each other's
    cmd = [
        sys.executable, "-m", "xtuner.tools.model_converters.merge", str(base_model), str(adapter), str(tmp),
        "--safe-serialization", "--device", "cuda" if torch.cuda.is_available() else "cpu",
    ] + (["--is-clip"] if clip else [])  # fmt: skip
    env = {**launcher.environment(launcher.Launch(config=Path(), work_dir=Path(), log=Path())),
           protocol.CONTROL_ENV: "0"}  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    except BaseException:  # Ctrl-C while it runs: leave no half model behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"XTuner's merge exited with code {proc.returncode}:\n{tail}")
    if not atomic.publish_dir(tmp, out):
        raise FileExistsError(f"{out}: was filled by another writer while the merge ran; the merged model was not kept")
