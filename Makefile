# `make demo` and `make test` set everything up on a fresh machine (Python 3.11+, pip, no GPU needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
TINY_MODEL := .cache/tiny-model
TINY_LLAVA := .cache/tiny-llava
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-llava test lint tiny-model tiny-llava clean

setup: $(STAMP) $(TINY_MODEL)/config.json $(TINY_LLAVA)/projector.pth

# One resolve by uv of everything: requirements.txt (XTuner, torch and what XTuner needs), this package and its
# dev tools, with XTuner's broken bitsandbytes pin replaced through overrides.txt (pip cannot replace a pin).
# tools/uv_install.py hands uv the package sources pip is set up with (uv reads no pip configuration).
# --compile-bytecode: uv leaves no .pyc (pip does), and where PYTHONDONTWRITEBYTECODE is set (this CI machine) every
# process that imports Transformers and XTuner (each test's sweep, each training worker) compiled them again.
$(STAMP): pyproject.toml requirements.txt overrides.txt tools/uv_install.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(PY) tools/uv_install.py --quiet --compile-bytecode --override overrides.txt -r requirements.txt -e '.[dev]'
	touch $@

$(TINY_MODEL)/config.json: $(STAMP) data/tiny_model.py data/demo/task.jsonl data/demo/general.jsonl
	$(PY) data/tiny_model.py $(TINY_MODEL)

tiny-model: $(TINY_MODEL)/config.json

# The LLaVA demo's parts: a tiny LLM, a CLIP-shaped vision tower and the projector pretrained on the bundled pictures.
$(TINY_LLAVA)/projector.pth: $(STAMP) data/tiny_llava.py data/tiny_model.py data/llava_demo/task.json \
		data/llava_demo/captions.json data/llava_demo/general.json
	$(PY) data/tiny_llava.py $(TINY_LLAVA)

tiny-llava: $(TINY_LLAVA)/projector.pth

demo: setup
	$(VENV)/bin/sweep run configs/demo.yaml
	$(VENV)/bin/sweep report demo

demo-llava: setup
	$(VENV)/bin/sweep run configs/llava_demo.yaml
	$(VENV)/bin/sweep report llava_demo

# In parallel: one test process per CPU (at most 4), each pinned to its share of the CPUs; under --dist loadscope
# tests/conftest.py keeps the tests that share a training fixture in one process, so that it trains once (xdist's
# own --dist loadgroup does not group under pytest 9).
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadscope

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf sweep-runs sweep.db mlflow.db mlflow.db.champion.lock sweep.db.claims mlruns mlartifacts
