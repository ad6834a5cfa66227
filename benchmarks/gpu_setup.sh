# The setup benchmarks/gpu_smoke.sh and benchmarks/gpu_llava.sh share; each sources it from the repository root
# after setting NAME (what `say` prints first), RESULTS (the folder that comes back) and WORK (emptied here).
# It installs the wheels carried as .whl (unless XTuner is importable already or /tmp/site holds them), sets the
# offline environment and PYTHONPATH, and sets GPU (1 or 0, printing the GPU when there is one); the functions
# below make the model parts and print the versions.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
ROOT=$PWD
mkdir -p "$RESULTS"
rm -rf "$WORK"; mkdir -p "$WORK"
PY=${PYTHON:-python3}
started=$(date +%s)
say() { echo "[$NAME $(( $(date +%s) - started ))s] $*"; }
. "$ROOT/benchmarks/gpu_install.sh"
say "wheels installed"
if $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  GPU=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
  GPU=0
fi

build_once() {  # DIR MARKER LOG SCRIPT [ARGS...]: `python data/SCRIPT ARGS DIR` unless DIR/MARKER exists; its output
  local dir=$1 marker=$2 log=$3 script=$4  # in $RESULTS/LOG, whose tail is shown (and the script exits) on failure
  shift 4
  [ -f "$dir/$marker" ] || $PY "data/$script" "$@" "$dir" > "$RESULTS/$log" 2>&1 || { tail -20 "$RESULTS/$log"; exit 1; }
}

copy_in_bf16() {  # SRC DST [LLM]: a copy of SRC with its LLM (SRC itself, or its subfolder LLM) saved in bf16
  $PY - "$@" <<'PY' || exit 1
import shutil, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
llm = sys.argv[3] if len(sys.argv) > 3 else ""
shutil.copytree(src, dst)
AutoModelForCausalLM.from_pretrained(src / llm).to(torch.bfloat16).save_pretrained(dst / llm)
PY
}

versions() {
  $PY -c 'import torch, transformers, peft, xtuner, mmengine, optuna, mlflow; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "xtuner", xtuner.__version__, "optuna", optuna.__version__, "mlflow", mlflow.__version__)'
}
