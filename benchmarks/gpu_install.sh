# The wheels carried as .whl (benchmarks/gpu_wheels.sh) installed into /tmp/site once per machine, their bytecode
# compiled in parallel as a user's pip install leaves it (else every process that imports them compiles the same
# modules again), and /tmp/site and the checkout put on PYTHONPATH. Sourced from the repository root by every
# GPU script; does nothing where XTuner is importable already or /tmp/site holds it. Matplotlib's font cache (XTuner's
# dataset package imports matplotlib, which builds it the first time on a machine: seconds, once) is built here, as
# a user's machine has it after its first run, so that neither half of a benchmark pays for a fresh machine.
if ! "${PYTHON:-python3}" -c 'import xtuner' 2>/dev/null && [ ! -d /tmp/site/xtuner ]; then
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  "${PYTHON:-python3}" -m compileall -q -j 0 /tmp/site > /dev/null
  PYTHONPATH=/tmp/site "${PYTHON:-python3}" -c 'import matplotlib.font_manager' 2>/dev/null
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
