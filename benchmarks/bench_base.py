# A stock XTuner 0.2.0 LoRA config for the throughput benchmark (benchmarks/throughput.py): the shape of the
# team's H100 baseline (../shared/gpu/probe/cfg.tpl). Stock runs get a copy with the knob lines below rewritten;
# `sweep` uses it as `base_config` and replaces model path, data, batch size, LoRA rank and iterations itself.
import torch
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer
from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import openai_map_fn, template_map_fn_factory
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune
from xtuner.utils import PROMPT_TEMPLATE

path = "/tmp/big"
data_file = "/tmp/bench/train.jsonl"
max_length = 2048
batch_size = 1
iters = 20
lora_r = 64
checkpointing = True
lr = 2e-4
tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=path, padding_side="right")
model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=False,
    use_activation_checkpointing=checkpointing,
    llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=path, torch_dtype=torch.bfloat16),
    lora=dict(
        type=LoraConfig,
        r=lora_r,
        lora_alpha=16,
        lora_dropout=0.1,
        bias="none",
        task_type="CAUSAL_LM",
    ),
)
train_dataset = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path="json", data_files=dict(train=data_file)),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=openai_map_fn,
    template_map_fn=dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.qwen_chat),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=True,
    use_varlen_attn=False,
    map_num_proc=1,  # packing depends on the shard count: stock and sweep pack the same rows
)
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=0,
    dataset=train_dataset,
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=False),
)
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=AdamW, lr=lr, weight_decay=0),
    clip_grad=dict(max_norm=1, error_if_nonfinite=False),
    accumulative_counts=1,
    loss_scale="dynamic",
    dtype="bfloat16",
)
param_scheduler = [dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=False, begin=0, end=iters)]
train_cfg = dict(type=TrainLoop, max_iters=iters)
default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=1),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=100000, max_keep_ckpts=1),
    sampler_seed=dict(type=DistSamplerSeedHook),
)
env_cfg = dict(
    cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0), dist_cfg=dict(backend="nccl")
)
visualizer = None
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
log_processor = dict(by_epoch=False, window_size=1)
