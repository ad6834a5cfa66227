#!/usr/bin/env bash
# A real sweep on a GPU machine (no network): the Qwen2-1.5B-shaped random-init model, the bundled data,
# LoRA (bf16/fp16 AMP from XTuner's base config) or QLoRA nf4 (QUANTIZE=true, needs bitsandbytes).
# Run from the repository root with the wheels of ../shared/gpu/fetch-wheels.sh in .whl/ (see docs/benchmarks.md):
#   N_TRIALS=3 QUANTIZE=false bash benchmarks/gpu_sweep.sh
#   N_TRIALS=1 GPUS_PER_TRIAL=2 bash benchmarks/gpu_sweep.sh    # torchrun + DeepSpeed ZeRO-2 over 2 GPUs
#                                                                 (fetch-wheels.sh --deepspeed, nvidia-h200-x2)
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
OUT=${OUT:-/tmp/gpu-sweep}; mkdir -p "$OUT"
. benchmarks/gpu_install.sh
[ -f /tmp/big/config.json ] || python3 data/tiny_model.py --shape qwen2-1.5b /tmp/big > "$OUT/model.log" 2>&1
cat > "$OUT/spec.yaml" <<YAML
study: gpu-${QUANTIZE:-false}-${GPUS_PER_TRIAL:-1}
gpus_per_trial: ${GPUS_PER_TRIAL:-1}
base_config: internlm2_1_8b_qlora_alpaca_e3
model: {path: /tmp/big, template: qwen_chat, quantize: ${QUANTIZE:-false}}
data: {task: $PWD/data/demo/task.jsonl, general: $PWD/data/demo/general.jsonl, val: 0.15, test: 0.1, seed: 0}
fixed: {max_length: 512, accumulative_counts: 1, max_epochs: 2}
search_space:
  lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
  lora_r: {type: categorical, choices: [8, 64]}
  batch_size: {type: categorical, choices: [1, 4]}
  mix_ratio: {type: float, low: 0.0, high: 0.3}
pruner: {type: none}
n_trials: ${N_TRIALS:-3}
eval_every: 32
registry: {name: gpu-adapter}
YAML
cd "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m sweep.cli run spec.yaml --json > report.json 2> sweep.log || { tail -n 60 sweep.log; exit 1; }
python3 -m sweep.cli report "gpu-${QUANTIZE:-false}-${GPUS_PER_TRIAL:-1}"
cat report.json
for t in sweep-runs/*/trial_*; do
  echo "== $t"; grep -E '"kind": "(start|end)"' "$t/sweep_metrics.jsonl" | cut -c1-300
  python3 - "$t/sweep_metrics.jsonl" <<'PY'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1])]
tr = [e for e in ev if e["kind"] == "train"][3:]  # skip warm-up iterations
if tr:
    tps = sorted(e["perf/tokens_per_sec"] for e in tr)[len(tr) // 2]
    print(f"median tokens/s {tps:.0f}  peak memory {max(e['perf/memory_mb'] for e in tr):.0f} MB  iters {len(tr) + 3}")
PY
done
