"""The champion as an MLflow pyfunc model: questions in, greedy answers out, in the trial's template.

``mlflow.pyfunc.load_model("models:/NAME@champion").predict(["question", ...])`` loads the base
model, applies the LoRA adapter and answers with the same prompt template the adapter was trained
with. Small base models (the demo's) are stored inside the registered model so it loads anywhere;
large ones are referenced by their local directory, as XTuner's own ``xtuner chat`` does.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel

from sweep.registry.tracking import Tracker

BUNDLE_LIMIT_BYTES = 200 * 2**20


class AdapterChatModel(PythonModel):
    """A base LLM plus a LoRA adapter, answering a list of questions with greedy decoding."""

    def load_context(self, context) -> None:
        from sweep.registry.scoring import load_adapter_model

        cfg = context.model_config
        base = context.artifacts.get("base_model") or cfg["base_model_path"]
        adapter = Path(context.artifacts["adapter"])
        trust = cfg.get("trust_remote_code") is True  # only the loader's own override sets it (see log_chat_model)
        if cfg.get("needs_remote_code") and not trust:
            raise RuntimeError(
                "this model's base model runs code of its own (trust_remote_code); load it with "
                "mlflow.pyfunc.load_model(uri, model_config={'trust_remote_code': True}) if you trust its source"
            )
        self.model, self.tokenizer = load_adapter_model(
            Path(base), adapter, cpu_amp=bool(cfg.get("cpu_amp")), trust_remote_code=trust
        )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.template = cfg["template"]
        self.system = cfg.get("system", "")
        self.max_new_tokens = int(cfg.get("max_new_tokens", 64))

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        from sweep.xtuner.generation import generate_answers

        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        return generate_answers(self.model, self.tokenizer, self.template, list(model_input), self.system, max_new)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def log_chat_model(
    run_id: str,
    tracker: Tracker,
    adapter: Path,
    base_model: Path,
    template: dict[str, Any],
    system: str = "",
    max_new_tokens: int = 64,
    cpu_amp: bool = False,
    needs_remote_code: bool = False,
) -> str:
    """Log the adapter as a pyfunc model in ``run_id``; returns the model URI to register.

    The bundle records whether its base model needs remote code but never grants it: whoever can write the
    registry could otherwise make every loader run their code. A loader grants it with
    ``model_config={"trust_remote_code": True}``.
    """
    artifacts = {"adapter": str(adapter)}
    config: dict[str, Any] = {"template": template, "system": system, "max_new_tokens": max_new_tokens,
                              "cpu_amp": cpu_amp, "needs_remote_code": needs_remote_code,
                              "trust_remote_code": False}  # fmt: skip  # MLflow lets a loader override logged keys only
    with tempfile.TemporaryDirectory() as tmp:
        if _folder_bytes(base_model) <= BUNDLE_LIMIT_BYTES:
            bundled = Path(tmp) / "base_model"
            shutil.copytree(base_model, bundled, ignore=shutil.ignore_patterns("*.pth", "*.pt"))
            artifacts["base_model"] = str(bundled)
        else:
            config["base_model_path"] = str(base_model)
        return tracker.log_pyfunc(
            run_id,
            name="model",
            python_model=AdapterChatModel(),
            artifacts=artifacts,
            model_config=config,
            pip_requirements=["torch", "transformers", "peft", "xtuner-sweep"],
        )
