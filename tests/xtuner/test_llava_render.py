"""A LLaVA trial's config (sweep.xtuner.llava via render): the spec's parts and knobs where a LLaVA config keeps
them, the user's own settings kept, the study's rows in XTuner's LLaVADataset."""

from __future__ import annotations

from pathlib import Path

from sweep.preflight import check
from sweep.spec import load_spec
from sweep.xtuner.config import load_config
from tests.conftest import write_llava_spec

TUTORIAL = "llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune"


def _copied_config(folder: Path, old: str, new: str) -> Path:
    """The tutorial's LLaVA config as `xtuner copy-cfg` copies it, with one edit."""
    from xtuner.configs import cfgs_name_path

    text = Path(cfgs_name_path[TUTORIAL]).read_text()
    assert old in text
    path = folder / "my_llava_copy.py"
    path.write_text(text.replace(old, new))
    return path


def _rendered(folder: Path, parts: Path, **blocks: str):
    spec = load_spec(write_llava_spec(folder, parts, **blocks))
    out = folder / "trial.py"
    out.write_text(check(spec).config_text)
    return load_config(out)


def test_knobs_and_parts_go_where_a_llava_config_keeps_them(tmp_path, tiny_llava):
    cfg = _rendered(tmp_path, tiny_llava, fixed="fixed: {max_length: 64, max_epochs: 2, batch_size: 8, lora_r: 32, "
                    "lora_alpha: 16, visual_lora_r: 4, visual_lora_alpha: 8, accumulative_counts: 2}")  # fmt: skip
    assert (cfg.model.llm_lora.r, cfg.model.llm_lora.lora_alpha) == (32, 16)
    assert (cfg.model.visual_encoder_lora.r, cfg.model.visual_encoder_lora.lora_alpha) == (4, 8)
    assert cfg.model.visual_encoder.pretrained_model_name_or_path == str(tiny_llava / "visual_encoder")
    assert cfg.model.pretrained_pth == str(tiny_llava / "projector.pth")
    assert "quantization_config" not in cfg.model.llm and cfg.model.llm.torch_dtype == "float32", "CPU: fp32"
    loader = cfg.train_dataloader
    assert loader.sampler.per_device_batch_size == 16, "LengthGroupedSampler groups by batch x accumulation"
    assert loader.num_workers == 0 and loader.dataset.type == "sweep.xtuner.llava.llava_dataset"
    assert loader.dataset.pad_image_to_square is True, "the tutorial pads pictures to a square"
    assert cfg.val_dataloader.dataset.data_path.endswith("val.jsonl")
    assert not any("EvaluateChatHook" in str(h["type"]) for h in cfg.custom_hooks)


def test_the_users_own_llava_settings_are_kept(tmp_path, tiny_llava):
    """A copied config that does not pad pictures, and has no projector: rendered so, and validated the same way."""
    copy = _copied_config(tmp_path, "pad_image_to_square=True", "pad_image_to_square=False")
    no_projector = f"model: {{path: {tiny_llava / 'llm'}, visual_encoder: {tiny_llava / 'visual_encoder'}}}"
    cfg = _rendered(tmp_path, tiny_llava, base_config=f"base_config: {copy}", model=no_projector)
    assert cfg.train_dataloader.dataset.pad_image_to_square is False
    assert cfg.val_dataloader.dataset.pad_image_to_square is False
    assert cfg.model.pretrained_pth is None, "no projector in the spec: a random one, as pretrained_pth=None"
