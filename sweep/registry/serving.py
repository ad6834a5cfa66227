"""The champion as an MLflow pyfunc model: questions in, answers out, in the trial's template.

``mlflow.pyfunc.load_model("models:/NAME@champion").predict(["question", ...])`` loads the base
model, applies the LoRA adapter and answers with the same prompt template the adapter was trained
with: greedy, as the sweep scored it, unless ``params`` asks for `sweep chat`'s sampling settings
(``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``, ``max_new_tokens``, ``system``).
MLflow passes ``params`` on only to a model logged with a params schema (``chat_signature``); without one
it drops them with a warning. Small base models (the demo's) are stored inside the registered model so it
loads anywhere; large ones are referenced by their local directory, as XTuner's own ``xtuner chat`` does.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel

from sweep.registry.tracking import Tracker

BUNDLE_LIMIT_BYTES = 200 * 2**20


def granted_trust(cfg: dict[str, Any]) -> bool:
    """Whether the loader granted remote code (only its own ``model_config`` override sets it, see log_chat_model);
    a base model that needs it and was not granted it is refused."""
    trust = cfg.get("trust_remote_code") is True
    if cfg.get("needs_remote_code") and not trust:
        raise RuntimeError(
            "this model's base model runs code of its own (trust_remote_code); load it with "
            "mlflow.pyfunc.load_model(uri, model_config={'trust_remote_code': True}) if you trust its source"
        )
    return trust


class AdapterChatModel(PythonModel):
    """A base LLM plus a LoRA adapter, answering a list of questions (greedy unless params ask to sample)."""

    # The signature is logged explicitly (chat_signature): MLflow need not look for type hints on predict, nor warn
    # at import that there are none (the attribute MLflow's own ChatModel subclasses use).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from sweep.registry.scoring import load_adapter_model

        cfg = context.model_config
        base = context.artifacts.get("base_model") or cfg["base_model_path"]
        adapter = Path(context.artifacts["adapter"])
        trust = granted_trust(cfg)
        self.model, self.tokenizer = load_adapter_model(
            Path(base), adapter, cpu_amp=bool(cfg.get("cpu_amp")), trust_remote_code=trust
        )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.template = cfg["template"]
        self.system = cfg.get("system", "")
        self.max_new_tokens = int(cfg.get("max_new_tokens", 64))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        """One answer per question, each asked alone; a sampled list repeats for the same ``seed``.

        No type hint on ``model_input``: MLflow would then take the signature from the hints, which hold no
        params schema, and drop every param. MLflow hands the questions over as a one-column DataFrame.
        """
        from sweep.xtuner.conversation import Conversation, Sampling, generate_reply, seeded
        from sweep.xtuner.generation import generate_answers

        questions = _questions(model_input)
        given = {k: v for k, v in (params or {}).items() if v is not None}
        system = str(given.pop("system", self.system))
        known = {name: given[name] for name in PARAM_DEFAULTS if name in given}
        sampling = Sampling(**{**PARAM_DEFAULTS, "max_new_tokens": self.max_new_tokens, **known})
        if sampling.greedy and sampling.repetition_penalty == 1.0:  # batched: what validation and the gate scored
            return generate_answers(
                self.model, self.tokenizer, self.template, questions, system, sampling.max_new_tokens
            )
        answers = []
        with seeded(sampling.seed, next(self.model.parameters()).device):
            for question in questions:
                prompt = Conversation(self.tokenizer, self.template, system).prompt(question)
                answers.append(generate_reply(self.model, self.tokenizer, self.template, prompt, sampling))
        return answers


#: The generation params ``predict`` takes, with their defaults (``max_new_tokens``: the logged value).
PARAM_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 64, "temperature": 0.0, "top_k": 40, "top_p": 0.75, "repetition_penalty": 1.0, "seed": 0,
}  # fmt: skip


def chat_signature(max_new_tokens: int):
    """Questions (strings) in, answers out, and the generation params with their defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    types = {int: "long", float: "double"}
    params = [
        ParamSpec(name, types[type(default)], max_new_tokens if name == "max_new_tokens" else default)
        for name, default in PARAM_DEFAULTS.items()
    ]
    params.append(ParamSpec("system", "string", None))  # None: the system text the adapter was trained with
    return ModelSignature(
        inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]), params=ParamSchema(params)
    )


def _questions(model_input: Any) -> list[str]:
    """A list, a string, or the one-column DataFrame (or Series) MLflow makes of a list of strings."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc") and getattr(model_input, "ndim", 1) == 2:
        model_input = model_input.iloc[:, 0]
    return [str(q) for q in list(model_input)]


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class LlavaChatModel(PythonModel):
    """A LLaVA checkpoint (``llm_adapter/``, ``visual_encoder_adapter/``, ``projector/``) on its base LLM and vision
    tower, answering rows of (image, question) greedily, as the sweep scored it.

    ``predict`` takes a DataFrame (or a list of dicts) with columns ``image`` (a file path, or the file's bytes)
    and ``question``; an empty image asks the question alone. ``params``: ``max_new_tokens`` and ``system``.
    """

    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor

        from sweep.registry.scoring import _device, inference_dtype
        from sweep.xtuner.llava_model import load_llava

        cfg = context.model_config
        llm = Path(context.artifacts.get("base_model") or cfg["base_model_path"])
        tower = Path(context.artifacts.get("visual_encoder") or cfg["visual_encoder_path"])
        trust = granted_trust(cfg)
        checkpoint = Path(context.artifacts["checkpoint"])
        self.model = load_llava(llm, tower, checkpoint, None, inference_dtype(bool(cfg.get("cpu_amp"))), _device(),
                                trust_remote_code=trust)  # fmt: skip
        self.tokenizer = AutoTokenizer.from_pretrained(llm, trust_remote_code=trust)
        self.processor = CLIPImageProcessor.from_pretrained(tower)
        self.template, self.system = cfg["template"], cfg.get("system", "")
        self.max_new_tokens = int(cfg.get("max_new_tokens", 64))
        self.square = bool(cfg["llava"].get("square", True))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from sweep.xtuner.llava_model import generate_image_replies

        given = {k: v for k, v in (params or {}).items() if v is not None}
        with tempfile.TemporaryDirectory() as tmp:
            items = _image_rows(model_input, Path(tmp))
            replies = generate_image_replies(
                self.model, self.tokenizer, self.processor, self.template, items,
                str(given.get("system", self.system)), int(given.get("max_new_tokens", self.max_new_tokens)),
                self.square,
            )  # fmt: skip
        return [r.text for r in replies]


def _image_rows(model_input: Any, tmp: Path) -> list[tuple[str | None, str]]:
    """(picture file or None, question) of each row: a DataFrame or a list of dicts with ``image`` and ``question``;
    an image given as bytes is written to ``tmp`` first."""
    rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
    items = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "question" not in row:
            raise ValueError(f"row {i}: expected an 'image' (file path or bytes) and a 'question'")
        image = row.get("image")
        if isinstance(image, (bytes, bytearray)):
            path = tmp / f"image_{i}"
            path.write_bytes(image)
            image = str(path)
        elif not isinstance(image, str):  # None, or pandas' NaN: a row without a picture
            image = None
        items.append((image or None, str(row["question"])))
    return items


def llava_signature(max_new_tokens: int):
    """Rows of image (a file path or its bytes) and question in, answers out; ``max_new_tokens`` and ``system``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image", required=False), ColSpec("string", "question")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens), ParamSpec("system", "string", None)]),
    )


def log_llava_model(
    run_id: str,
    tracker: Tracker,
    checkpoint: Path,
    base_model: Path,
    visual_encoder: Path,
    template: dict[str, Any],
    system: str = "",
    max_new_tokens: int = 64,
    cpu_amp: bool = False,
    needs_remote_code: bool = False,
    square: bool = True,
) -> str:
    """``log_chat_model`` for a LLaVA checkpoint: its folder, and the LLM and tower bundled when they are small."""
    config = _model_config(template, system, max_new_tokens, cpu_amp, needs_remote_code)
    config["llava"] = {"square": square}
    return _log_model(
        run_id, tracker, LlavaChatModel(), {"checkpoint": str(checkpoint)}, config,
        {"base_model": (base_model, "base_model_path"), "visual_encoder": (visual_encoder, "visual_encoder_path")},
        llava_signature(max_new_tokens), ["torch", "transformers", "peft", "xtuner", "xtuner-sweep"],
    )  # fmt: skip


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
    return _log_model(
        run_id, tracker, AdapterChatModel(), {"adapter": str(adapter)},
        _model_config(template, system, max_new_tokens, cpu_amp, needs_remote_code),
        {"base_model": (base_model, "base_model_path")},
        chat_signature(max_new_tokens), ["torch", "transformers", "peft", "xtuner-sweep"],
    )  # fmt: skip


def _model_config(
    template: dict[str, Any], system: str, max_new_tokens: int, cpu_amp: bool, needs_remote_code: bool
) -> dict[str, Any]:
    """The logged model config both kinds of model read; remote code is never granted here (see log_chat_model)."""
    return {"template": template, "system": system, "max_new_tokens": max_new_tokens, "cpu_amp": cpu_amp,
            "needs_remote_code": needs_remote_code,
            "trust_remote_code": False}  # fmt: skip  # MLflow lets a loader override logged keys only


def _log_model(
    run_id: str,
    tracker: Tracker,
    python_model: PythonModel,
    artifacts: dict[str, str],
    config: dict[str, Any],
    folders: dict[str, tuple[Path, str]],
    signature: Any,
    pip_requirements: list[str],
) -> str:
    """Log ``python_model`` in ``run_id``; returns the model URI. Each of ``folders`` (artifact name: (base folder,
    config key)) is bundled as that artifact when it is small, or else referenced by its path under the config key."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, (folder, key) in folders.items():
            if _folder_bytes(folder) <= BUNDLE_LIMIT_BYTES:
                bundled = Path(tmp) / name
                shutil.copytree(folder, bundled, ignore=shutil.ignore_patterns("*.pth", "*.pt"))
                artifacts[name] = str(bundled)
            else:
                config[key] = str(folder)
        with warnings.catch_warnings():  # an input example would make MLflow load the model and predict, here
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            return tracker.log_pyfunc(
                run_id,
                name="model",
                python_model=python_model,
                artifacts=artifacts,
                model_config=config,
                signature=signature,
                pip_requirements=pip_requirements,
            )
