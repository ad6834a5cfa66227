# The wheels carried as .whl (benchmarks/gpu_wheels.sh) installed into /tmp/site once per machine, their bytecode
# compiled in parallel as a user's pip install leaves it (else every process that imports them compiles the same
# modules again), and /tmp/site and the checkout put on PYTHONPATH. Sourced from the repository root by every
# GPU script; does nothing where XTuner is importable already or /tmp/site holds it.
if ! "${PYTHON:-python3}" -c 'import xtuner' 2>/dev/null && [ ! -d /tmp/site/xtuner ]; then
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  "${PYTHON:-python3}" -m compileall -q -j 0 /tmp/site > /dev/null
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
