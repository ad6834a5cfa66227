#!/usr/bin/env bash
# Issue 6's benchmark in one device call (about 8 minutes on an H200): install the wheels, build the model and
# data, run (b) `sweep` then (a) stock XTuner, print the report, and leave what explains a failure in $OUT
# (the figures as JSON, the sweep's log, and one archive of every trial's metric stream and the worker logs).
#   bash benchmarks/gpu_throughput.sh          # from the repository root, .whl/ carried (docs/benchmarks.md)
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" BENCH_WORK=${BENCH_WORK:-/tmp/bench}
RESULTS=${OUT:-/tmp/bench-results}; mkdir -p "$RESULTS"; export OUT="$BENCH_WORK/out"
[ -d /tmp/site/xtuner ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
rm -rf "$BENCH_WORK/sweep" "$OUT"
python3 benchmarks/throughput.py prepare > "$RESULTS/prepare.log" 2>&1 || { tail -20 "$RESULTS/prepare.log"; exit 1; }
python3 benchmarks/throughput.py sweep > "$RESULTS/sweep_step.log" 2>&1; echo "sweep step: exit $?"
cp "$BENCH_WORK/sweep/sweep.log" "$RESULTS/" 2>/dev/null
(cd "$BENCH_WORK/sweep" && tar czf "$RESULTS/trials.tgz" sweep-runs/throughput/trial_*/sweep_metrics.jsonl \
  sweep-runs/throughput/trial_*/worker.json sweep-runs/throughput/workers 2>/dev/null)
python3 benchmarks/throughput.py stock 0 12 > "$RESULTS/stock_step.log" 2>&1; echo "stock step: exit $?"
cp "$OUT"/*.json "$RESULTS/" 2>/dev/null
python3 benchmarks/throughput.py report | tee "$RESULTS/report.txt"
