#!/usr/bin/env bash
# The single-step benchmark (benchmarks/step_speed.py) in one device call, wheels of `bash benchmarks/gpu_wheels.sh`
# carried as .whl. STEPS names what to run (default below); every run's figures land in $OUT/step_speed.json at once.
#   STEPS="stock:4,8 nockpt:4 sweep:4:off,4:chunked,4:cce" bash benchmarks/gpu_step_speed.sh
set -uo pipefail
. benchmarks/gpu_install.sh
export BENCH_WORK=${BENCH_WORK:-/tmp/bench}
RESULTS=${OUT:-/tmp/bench-results}; mkdir -p "$RESULTS"; export OUT="$RESULTS"
STEPS=${STEPS:-"stock:1,2,4,8 nockpt:4,8 sweep:4:off,4:chunked,4:cce,4:liger,1:cce,2:cce,8:cce,8:cce+compile"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/throughput.py prepare > "$RESULTS/prepare.log" 2>&1 || { tail -20 "$RESULTS/prepare.log"; exit 1; }
for step in $STEPS; do
  kind=${step%%:*}; args=${step#*:}
  case $kind in
    stock) python3 benchmarks/step_speed.py stock ${args//,/ } > "$RESULTS/stock.log" 2>&1 ;;
    nockpt) python3 benchmarks/step_speed.py stock-nockpt ${args//,/ } > "$RESULTS/nockpt.log" 2>&1 ;;
    sweep) python3 benchmarks/step_speed.py sweep ${args//,/ } > "$RESULTS/sweep.log" 2>&1 ;;
  esac
  echo "$kind: exit $?"
done
python3 benchmarks/step_speed.py report | tee "$RESULTS/report.txt"
