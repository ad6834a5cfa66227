#!/usr/bin/env bash
# The GPU smoke test: a change to code that runs inside training is done only when this passes on a GPU machine.
# One device call, from the repository root, with the wheels of `bash benchmarks/gpu_wheels.sh` carried as .whl:
#   bash benchmarks/gpu_smoke.sh
# (1) a 3-trial LoRA sweep of the Qwen2-1.5B-shaped model in bf16 (bf16 weights, bf16 AMP), (2) trial 0 of it again
# with the frozen weights left in fp32 (speed.frozen_weights_16bit: false): its val/loss must match within bf16
# tolerance, (3) a 2-trial sweep with speed.trials_per_worker 2 (both trials in one worker at once, their steps
# joined over one shared base model; SMOKE_JOINED=0 skips it), (4) a 2-trial QLoRA nf4 sweep (fp16 AMP, the
# tutorial's internlm2 QLoRA config). Each sweep validates (loss, general loss, greedy answers for val/rouge_l,
# probes), prunes (median), gates on the test split and registers a champion; (1) and (4)'s champions must answer
# through `mlflow.pyfunc` on the GPU. Exits non-zero unless every trial COMPLETEs or is PRUNED, the curves match, the
# joined trials trained joined and every champion answers. SMOKE_LORA=0 (with it (2)), SMOKE_MATH=0, SMOKE_JOINED=0
# and SMOKE_QLORA=0 skip (1), (2), (3) and (4): a partial run, which the last line says. SMOKE_SPEED adds speed settings
# to every sweep's spec (e.g. SMOKE_SPEED='fork_workers: on').
# Without a GPU it runs (1) to (3) on the tiny model with `cpu_amp: true`: a dry run of the script itself.
set -uo pipefail
NAME=smoke RESULTS=${OUT:-/tmp/gpu-smoke-results} WORK=${SMOKE_WORK:-/tmp/gpu-smoke}
. "$(dirname "$0")/gpu_setup.sh" || exit 1
if [ "$GPU" = 1 ]; then
  MODEL=${SMOKE_MODEL:-/tmp/big}; LENGTH=512; ITERS=30; EVAL_EVERY=384; CPU_AMP=false
  build_once "$MODEL" config.json model.log tiny_model.py --shape qwen2-1.5b
else
  MODEL=$WORK/tiny-bf16; LENGTH=64; ITERS=24; EVAL_EVERY=24; CPU_AMP=true
  copy_in_bf16 "$ROOT/.cache/tiny-model" "$MODEL"
fi
versions
say "model ready: $MODEL"

spec() {  # NAME BASE_CONFIG QUANTIZE N_TRIALS [SPEED_ITEMS]: the speed settings, after $SMOKE_SPEED's
  local speed=${SMOKE_SPEED:-} item items=""
  if [ -n "${5:-}" ]; then  # the part's own item wins over $SMOKE_SPEED's for the same key
    IFS=',' read -ra parts <<< "$speed"
    for item in "${parts[@]}"; do item=${item# }; [ "${item%%:*}" = "${5%%:*}" ] || items="${items:+$items, }$item"; done
    speed="${items:+$items, }$5"
  fi
  cat > "$WORK/$1.yaml" <<YAML
study: $1
base_config: $2
model: {path: $MODEL, template: qwen_chat, quantize: $3}
data: {task: $ROOT/data/demo/task.jsonl, general: $ROOT/data/demo/general.jsonl, val: 0.15, test: 0.1, seed: 0}
fixed: {max_iters: $ITERS, max_length: $LENGTH, accumulative_counts: 1, lora_alpha: 16}
search_space:
  lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
  lora_r: {type: categorical, choices: [8, 64]}
  batch_size: {type: categorical, choices: [1, 4]}
  mix_ratio: {type: float, low: 0.0, high: 0.3}
sampler: {type: random, seed: 0}
pruner: {type: median, n_startup_trials: 1, n_warmup_steps: 0}
n_trials: $4
eval_every: $EVAL_EVERY
probes: ["Who are you?", "你是谁？"]
generation: {max_new_tokens: 16, max_rows: 8}
registry: {name: $1}
cpu_amp: $CPU_AMP
speed: {$speed}
YAML
}

sweep() {  # NAME [VALUES...]: enqueue the given trial values (JSON), run the study, print its trials
  local name=$1; shift
  (cd "$WORK" && $PY - "$name" "$@" <<'PY') || return 1
import json, sys
from sweep.spec import load_spec
from sweep.storage import open_study
st = open_study(load_spec(f"{sys.argv[1]}.yaml"), "sqlite:///sweep.db")
for values in sys.argv[2:]:
    st.enqueue_trial(json.loads(values))
PY
  say "sweep $name"
  (cd "$WORK" && $PY -m sweep.cli run "$name.yaml" --storage sqlite:///sweep.db --tracking-uri sqlite:///mlflow.db \
    --json ${RUN_ARGS:-} > "$name.json" 2> "$name.log")
  local rc=$?
  cp "$WORK/$name.log" "$WORK/$name.json" "$RESULTS/" 2>/dev/null
  say "sweep $name: exit code $rc"
  (cd "$WORK" && $PY "$ROOT/benchmarks/smoke_check.py" trials "$name") || return 1
  return $rc
}

fail=0
TRIAL0='{"lr": 0.0005, "lora_r": 64, "batch_size": 4, "mix_ratio": 0.1}'
if [ "${SMOKE_LORA:-1}" = 1 ]; then  # SMOKE_LORA=0 skips it, and with it (2)
  spec smoke-lora "$ROOT/benchmarks/bench_base.py" false 3
  sweep smoke-lora "$TRIAL0" || fail=1
  (cd "$WORK" && $PY "$ROOT/benchmarks/smoke_check.py" champion smoke-lora) || fail=1
fi
if [ "${SMOKE_LORA:-1}" = 1 ] && [ "${SMOKE_MATH:-1}" = 1 ]; then  # SMOKE_MATH=0 skips it (docs/benchmarks.md has its time)
  spec smoke-fp32 "$ROOT/benchmarks/bench_base.py" false 1 "frozen_weights_16bit: false"
  sweep smoke-fp32 "$TRIAL0" || fail=1
  (cd "$WORK" && $PY "$ROOT/benchmarks/smoke_check.py" same-math smoke-lora smoke-fp32) || fail=1
fi
if [ "${SMOKE_JOINED:-1}" = 1 ]; then  # speed.trials_per_worker: two trials at once in one worker, steps joined
  spec smoke-joined "$ROOT/benchmarks/bench_base.py" false 2 "trials_per_worker: 2"
  RUN_ARGS="--n-jobs 2" sweep smoke-joined "$TRIAL0" '{"lr": 0.0002, "lora_r": 8, "batch_size": 1, "mix_ratio": 0.2}' || fail=1
  (cd "$WORK" && $PY "$ROOT/benchmarks/smoke_check.py" joined smoke-joined) || fail=1
fi
if [ "$GPU" = 1 ] && [ "${SMOKE_QLORA:-1}" = 1 ]; then  # SMOKE_QLORA=0 skips it (a partial run: say so where recorded)
  spec smoke-qlora internlm2_1_8b_qlora_alpaca_e3 true 2
  sweep smoke-qlora || fail=1
  (cd "$WORK" && $PY "$ROOT/benchmarks/smoke_check.py" champion smoke-qlora) || fail=1
fi
(cd "$WORK" && tar czf "$RESULTS/trials.tgz" sweep-runs/*/trial_*/sweep_metrics.jsonl sweep-runs/*/trial_*/train.log \
  sweep-runs/*/workers 2>/dev/null)
skipped=""
for part in LORA MATH JOINED QLORA; do
  var=SMOKE_$part; { [ "${!var:-1}" = 1 ] && { [ $part != MATH ] || [ "${SMOKE_LORA:-1}" = 1 ]; }; } || skipped="$skipped $part"
done
[ "$GPU" = 1 ] || [ "${SMOKE_QLORA:-1}" != 1 ] || skipped="$skipped QLORA (no GPU)"
[ -n "$skipped" ] && skipped=" (partial: skipped$skipped)"
say "$([ $fail = 0 ] && echo PASSED || echo FAILED)$skipped"
exit $fail
