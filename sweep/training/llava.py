"""A LLaVA trial inside XTuner's process: the losses on the right tokens, and its checkpoint as XTuner converts it.

``LLaVAModel`` puts a picture's patch features where the image token was, so its logits are longer than the
labels the data loader holds. ``predict_with_labels`` makes its ``mode='predict'`` hand back the labels of the
sequence it really ran (image positions ignored, as XTuner's loss ignores them), which ``ValLossMetric`` and
``general_loss`` then read: ``val/loss`` is LLaVA's own training loss on held-out rows. ``save_checkpoint`` writes
the best point in the layout of ``xtuner convert pth_to_hf`` (``llm_adapter/``, ``visual_encoder_adapter/`` when
the tower has LoRA, ``projector/``), which ``xtuner chat --llava DIR`` and ``sweep.xtuner.llava_model.load_llava`` load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sweep.xtuner.llava import LLM_ADAPTER, PROJECTOR, VISUAL_ADAPTER


def predict_with_labels() -> None:
    """Once per training process: ``LLaVAModel.predict`` returns each row's labels beside its logits."""
    from xtuner.model.llava import LLaVAModel

    if getattr(LLaVAModel.predict, "_with_labels", False):
        return

    def predict(self, data, data_samples=None):
        outputs = self.llm(**{k: v for k, v in data.items() if k != "labels"})
        labels = data.get("labels")
        return [
            {"logits": logits, **({"labels": labels[i]} if labels is not None else {})}
            for i, logits in enumerate(outputs.logits)
        ]

    predict._with_labels = True
    LLaVAModel.predict = predict


def is_llava_model(model: Any) -> bool:
    return hasattr(model, "projector") and hasattr(model, "visual_encoder")


def save_checkpoint(model: Any, folder: Path) -> None:
    """The trainable parts of a LLaVA model, as ``xtuner convert pth_to_hf`` writes them (adapters in fp32)."""
    from peft import PeftModel

    if isinstance(model.llm, PeftModel):
        model.llm.save_pretrained(str(folder / LLM_ADAPTER), safe_serialization=True)
    if isinstance(model.visual_encoder, PeftModel):
        model.visual_encoder.save_pretrained(str(folder / VISUAL_ADAPTER), safe_serialization=True)
    model.projector.save_pretrained(str(folder / PROJECTOR), safe_serialization=True)
