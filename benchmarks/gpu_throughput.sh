#!/usr/bin/env bash
# Issue 6's benchmark on a GPU machine: install the wheels, build the model and data, run (b) `sweep` and/or (a) stock
# XTuner, print the report, and leave what explains a failure in $OUT (the figures as JSON, the sweep's log, and one
# archive of every trial's metric stream and the worker logs).
#   bash benchmarks/gpu_throughput.sh                  # both halves in one call (more than 10 minutes on an H200)
#   STEPS=sweep bash benchmarks/gpu_throughput.sh      # one half per device call; then, here, with both calls'
#   STEPS=stock bash benchmarks/gpu_throughput.sh      # sweep.json and stock.json in one folder:
#   OUT=that/folder python3 benchmarks/throughput.py report
#   STEPS="sweep alone" ALONE="11 0" bash ...        # also trials 11 and 0 each alone through `sweep run`: the report
#                                                    # compares their per-step losses with the same trials in (b)
#   BENCH_ITERS=300 STEPS=sweep BENCH_STOCK=short/stock.json bash ...   # the 300-iteration variant: (b) measured,
#                                                    # (a) computed from the 20-iteration run's stock.json
#   STEPS=ab bash ...                                # (b) of an older tree's sweep code, then of this one, on the same
#                                                    # machine: first, here, `mkdir -p .bench/base && git archive REV sweep
#                                                    # benchmarks objectives data | tar -x -C .bench/base`, carry .bench/base
#   BENCH_SPEED="mps: off" STEPS=sweep bash ...       # (b) with its trials taking turns on the GPU (no MPS server),
#                                                    # as before speed.mps became auto
#   STEPS=speeds SPEEDS="fork_workers: off;fork_workers: on" ROUNDS=2 BENCH_STOCK=... bash ...   # (b) of this tree
#                                                    # with each of SPEEDS (BENCH_SPEED values) in turn, ROUNDS times
#                                                    # (every other round in reverse), after one warm-up: an A/B of
#                                                    # speed settings on one machine
#   BENCH_WARM=0 STEPS=sweep bash ...                # (b) without its unmeasured 1-trial warm-up sweep first: a fresh
#                                                    # machine's cold page cache and empty Triton cache in the figures
# The device returns at most 8 files from $OUT: STEPS="sweep stock" writes 8; run `alone` in a call of its own.
set -uo pipefail
. benchmarks/gpu_install.sh
export BENCH_WORK=${BENCH_WORK:-/tmp/bench}
RESULTS=${OUT:-/tmp/bench-results}; mkdir -p "$RESULTS"; export OUT="$RESULTS"  # each trial's figures land there at once
STEPS=${STEPS:-sweep stock}; ALONE=${ALONE:-11 0}
rm -rf "$BENCH_WORK/sweep"
python3 benchmarks/throughput.py prepare > "$RESULTS/prepare.log" 2>&1 || { tail -20 "$RESULTS/prepare.log"; exit 1; }
if [[ " $STEPS " == *" sweep "* ]]; then
  python3 benchmarks/throughput.py sweep > "$RESULTS/sweep_step.log" 2>&1; echo "sweep step: exit $?"
  grep -h "^sweep: rc" "$RESULTS/sweep_step.log"  # (b)'s wall time in the call's own output too
  cp "$BENCH_WORK/sweep/sweep.log" "$RESULTS/" 2>/dev/null
  (cd "$BENCH_WORK/sweep" && tar czf "$RESULTS/trials.tgz" sweep-runs/throughput/trial_*/sweep_metrics.jsonl \
    sweep-runs/throughput/trial_*/worker.json sweep-runs/throughput/workers 2>/dev/null)
fi
if [[ " $STEPS " == *" ab "* ]]; then
  for side in base new; do  # each side runs its own tree's throughput.py, which puts that tree first on PYTHONPATH
    tree=$PWD; [ $side = base ] && tree=$PWD/.bench/base
    [ -d "$tree/sweep" ] || { echo "ab: $tree/sweep missing (see the usage above)"; continue; }
    mkdir -p "$RESULTS/$side"; rm -rf "$BENCH_WORK/sweep"
    (cd "$tree" && PYTHONPATH="$tree:/tmp/site" OUT="$RESULTS/$side" python3 benchmarks/throughput.py sweep \
      > "$RESULTS/$side/sweep_step.log" 2>&1; echo "$side sweep step: exit $?"
     PYTHONPATH="$tree:/tmp/site" OUT="$RESULTS/$side" python3 benchmarks/throughput.py report > "$RESULTS/$side/report.txt" 2>&1)
    grep -E "^\(b\)|timeline:" "$RESULTS/$side/report.txt" | sed "s/^/$side: /"
  done
  (cd "$RESULTS" && tar czf ab.tgz base new 2>/dev/null && rm -rf base new)
  exit 0
fi
if [[ " $STEPS " == *" speeds "* ]]; then
  IFS=';' read -ra speeds <<< "${SPEEDS:?STEPS=speeds needs SPEEDS, e.g. \"fork_workers: off;fork_workers: on\"}"
  warm=${BENCH_WARM:-1}; runs=()
  for round in $(seq "${ROUNDS:-1}"); do
    order=("${!speeds[@]}"); [ $((round % 2)) = 0 ] && order=($(printf '%s\n' "${order[@]}" | tac))
    for i in "${order[@]}"; do  # ABBA...: drift over the call falls on both sides alike
      run="r$round-s$i"; runs+=("$run"); mkdir -p "$RESULTS/$run"; rm -rf "$BENCH_WORK/sweep"
      BENCH_SPEED="${speeds[$i]}" BENCH_WARM=$warm OUT="$RESULTS/$run" python3 benchmarks/throughput.py sweep \
        > "$RESULTS/$run/sweep_step.log" 2>&1; echo "$run (${speeds[$i]}): sweep step exit $?"; warm=0
      cp "$BENCH_WORK/sweep/sweep.log" "$RESULTS/$run/" 2>/dev/null
      (cd "$BENCH_WORK/sweep" && tar czf "$RESULTS/$run/trials.tgz" sweep-runs/throughput/trial_*/sweep_metrics.jsonl \
        sweep-runs/throughput/workers 2>/dev/null)
      OUT="$RESULTS/$run" python3 benchmarks/throughput.py report > "$RESULTS/$run/report.txt" 2>&1
      grep -E "^\(b\)|timeline:" "$RESULTS/$run/report.txt" | while IFS= read -r line; do echo "$run (${speeds[$i]}): $line"; done
    done
  done
  [ ${#runs[@]} -gt 0 ] || { echo "STEPS=speeds: ROUNDS must be at least 1"; exit 1; }
  (cd "$RESULTS" && tar czf speeds.tgz "${runs[@]}" && rm -rf "${runs[@]}")
  exit 0
fi
if [[ " $STEPS " == *" stock "* ]]; then
  python3 benchmarks/throughput.py stock 0 12 > "$RESULTS/stock_step.log" 2>&1; echo "stock step: exit $?"
fi
if [[ " $STEPS " == *" alone "* ]]; then
  python3 benchmarks/throughput.py alone $ALONE > "$RESULTS/alone_step.log" 2>&1; echo "alone step: exit $?"
fi
python3 benchmarks/throughput.py report | tee "$RESULTS/report.txt"
