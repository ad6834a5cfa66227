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

import mlflow
from mlflow.pyfunc import PythonModel

BUNDLE_LIMIT_BYTES = 200 * 2**20


def format_prompt(template: dict[str, Any], question: str, system: str = "") -> str:
    """The first turn of a conversation as XTuner's template_map_fn lays it out for training."""
    prompt = template.get("SYSTEM", "").format(system=system) if system and "SYSTEM" in template else ""
    return prompt + template["INSTRUCTION"].format(input=question, round=1)


def needs_bos(tokenizer: Any) -> bool:
    """XTuner's encode_fn prepends BOS except for the tokenizer families it special-cases."""
    name = type(tokenizer).__name__
    return tokenizer.bos_token_id is not None and not name.startswith(("Qwen", "QWen", "ChatGLM"))


class AdapterChatModel(PythonModel):
    """A base LLM plus a LoRA adapter, answering a list of questions with greedy decoding."""

    def load_context(self, context) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = context.model_config
        base = context.artifacts.get("base_model") or cfg["base_model_path"]
        self.tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=dtype, trust_remote_code=True)
        self.model = PeftModel.from_pretrained(model, context.artifacts["adapter"]).to(device).eval()
        self.device = device
        self.template = cfg["template"]
        self.system = cfg.get("system", "")
        self.max_new_tokens = int(cfg.get("max_new_tokens", 64))
        stop = [self.tokenizer.eos_token_id]
        for word in self.template.get("STOP_WORDS", []):
            ids = self.tokenizer.encode(word, add_special_tokens=False)
            if len(ids) == 1:
                stop.append(ids[0])
        self.stop_ids = sorted({i for i in stop if i is not None})

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        import torch

        questions = list(model_input)
        prompts = [format_prompt(self.template, q, self.system) for q in questions]
        bos = [self.tokenizer.bos_token_id] if needs_bos(self.tokenizer) else []
        ids = [bos + self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=self.stop_ids,
                pad_token_id=pad,
            )
        answers = []
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))
            answers.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return answers


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def log_chat_model(
    run_id: str,
    tracking_uri: str,
    adapter: Path,
    base_model: Path,
    template: dict[str, Any],
    system: str = "",
    max_new_tokens: int = 64,
) -> str:
    """Log the adapter as a pyfunc model in ``run_id``; returns the model URI to register."""
    mlflow.set_tracking_uri(tracking_uri)
    artifacts = {"adapter": str(adapter)}
    config: dict[str, Any] = {"template": template, "system": system, "max_new_tokens": max_new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        if _folder_bytes(base_model) <= BUNDLE_LIMIT_BYTES:
            bundled = Path(tmp) / "base_model"
            shutil.copytree(base_model, bundled, ignore=shutil.ignore_patterns("*.pth", "*.pt"))
            artifacts["base_model"] = str(bundled)
        else:
            config["base_model_path"] = str(base_model)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=AdapterChatModel(),
                artifacts=artifacts,
                model_config=config,
                pip_requirements=["torch", "transformers", "peft", "xtuner-sweep"],
            )
    return info.model_uri
