#!/usr/bin/env bash
# A LLaVA sweep of the XTuner tutorial's shape on one GPU (issue 14): 2 QLoRA nf4 trials, gpus_per_trial 1.
# One device call, from the repository root, with the wheels of `bash benchmarks/gpu_wheels.sh` carried as .whl:
#   bash benchmarks/gpu_llava.sh
# The tutorial's LLaVA config (llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune) on an
# InternLM2-chat-1.8B-shaped LLM and a CLIP-ViT-L/14-336-shaped tower with its projector, random init, built here
# (`python data/tiny_llava.py --shape tutorial`); the bundled demo pictures and questions. Each trial validates
# (val/loss on the answers, greedy answers with the picture for val/rouge_l, probes with pictures), the median pruner
# has its say, the test gate scores the best checkpoint and the untrained model and registers a champion, which
# must answer rows of image + question through `mlflow.pyfunc` on the GPU. Exits non-zero unless every trial
# COMPLETEs or is PRUNED and the champion answers. Logs, the trials' reports and event streams go to $OUT.
# Without a GPU it runs the same sweep on the tiny LLaVA parts (.cache/tiny-llava, `make tiny-llava`), LLM in bf16
# with `cpu_amp: true` and no quantization: a dry run of the script itself.
set -uo pipefail
NAME=llava RESULTS=${OUT:-/tmp/gpu-llava-results} WORK=${LLAVA_WORK:-/tmp/gpu-llava}
. "$(dirname "$0")/gpu_setup.sh" || exit 1
if [ "$GPU" = 1 ]; then
  PARTS=${LLAVA_PARTS:-/tmp/llava-tutorial}; QUANTIZE=true; CPU_AMP=false; TEMPLATE=internlm2_chat
  LENGTH=512; EPOCHS=2; EVAL_EVERY=32
  build_once "$PARTS" projector.pth parts.log tiny_llava.py --shape tutorial
else
  PARTS=$WORK/tiny-llava-bf16; QUANTIZE=false; CPU_AMP=true; TEMPLATE=qwen_chat
  LENGTH=64; EPOCHS=1; EVAL_EVERY=32
  build_once "$ROOT/.cache/tiny-llava" projector.pth parts.log tiny_llava.py
  copy_in_bf16 "$ROOT/.cache/tiny-llava" "$PARTS" llm
fi
versions
say "LLaVA parts ready: $PARTS"

DEMO=$ROOT/data/llava_demo
cat > "$WORK/llava-qlora.yaml" <<YAML
study: llava-qlora
base_config: llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune
model: {path: $PARTS/llm, visual_encoder: $PARTS/visual_encoder, projector: $PARTS/projector.pth,
        template: $TEMPLATE, quantize: $QUANTIZE}
data: {task: $DEMO/task.json, images: $DEMO/img, general: $DEMO/general.json, val: 0.15, test: 0.15, seed: 0}
fixed: {max_epochs: $EPOCHS, max_length: $LENGTH, accumulative_counts: 1, lora_alpha_ratio: 2.0, visual_lora_r: 16,
        visual_lora_alpha: 16}
search_space:
  lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
  lora_r: {type: categorical, choices: [64, 128]}
  batch_size: {type: categorical, choices: [4, 8]}
  mix_ratio: {type: float, low: 0.0, high: 0.2}
sampler: {type: random, seed: 0}
pruner: {type: median, n_startup_trials: 1, n_warmup_steps: 0}
n_trials: 2
eval_every: $EVAL_EVERY
probes: [{image: $DEMO/img/red_circle_0.png, question: "What colour is the shape?"},
         {image: $DEMO/img/blue_triangle_1.png, question: "图中是什么形状？"}]
generation: {max_new_tokens: 16, max_rows: 8}
registry: {name: llava-qlora}
gpus_per_trial: 1
cpu_amp: $CPU_AMP
YAML

fail=0
say "sweep llava-qlora (QLoRA nf4: $QUANTIZE)"
(cd "$WORK" && $PY -m sweep.cli run llava-qlora.yaml --storage sqlite:///sweep.db --tracking-uri sqlite:///mlflow.db \
  --json > llava-qlora.json 2> llava-qlora.log)
rc=$?
cp "$WORK/llava-qlora.log" "$WORK/llava-qlora.json" "$WORK/llava-qlora.yaml" "$RESULTS/" 2>/dev/null
say "sweep llava-qlora: exit code $rc"
[ $rc = 0 ] || fail=1
(cd "$WORK" && $PY -m sweep.cli report llava-qlora --storage sqlite:///sweep.db --tracking-uri sqlite:///mlflow.db \
  --no-plots) | tee "$RESULTS/report.txt" || fail=1
(cd "$WORK" && $PY "$ROOT/benchmarks/smoke_check.py" trials llava-qlora) || fail=1
(cd "$WORK" && $PY "$ROOT/benchmarks/smoke_check.py" llava-champion llava-qlora "$DEMO/img/green_square_2.png") || fail=1
(cd "$WORK" && tar czf "$RESULTS/trials.tgz" sweep-runs/*/trial_*/sweep_metrics.jsonl sweep-runs/*/trial_*/train.log \
  sweep-runs/*/workers 2>/dev/null)
say "$([ $fail = 0 ] && echo PASSED || echo FAILED)"
exit $fail
