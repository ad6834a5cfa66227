# `make demo` and `make test` set everything up on a fresh machine (Python 3.11+, pip, no GPU needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
TINY_MODEL := .cache/tiny-model
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint tiny-model clean

setup: $(STAMP) $(TINY_MODEL)/config.json

# One resolve by uv of everything: requirements.txt (XTuner, torch and what XTuner needs), this package and its
# dev tools, with XTuner's broken bitsandbytes pin replaced through overrides.txt (pip cannot replace a pin).
# tools/uv_install.py hands uv the package sources pip is set up with (uv reads no pip configuration).
$(STAMP): pyproject.toml requirements.txt overrides.txt tools/uv_install.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(PY) tools/uv_install.py --quiet --override overrides.txt -r requirements.txt -e '.[dev]'
	touch $@

$(TINY_MODEL)/config.json: $(STAMP) data/tiny_model.py data/demo/task.jsonl data/demo/general.jsonl
	$(PY) data/tiny_model.py $(TINY_MODEL)

tiny-model: $(TINY_MODEL)/config.json

demo: setup
	$(VENV)/bin/sweep run configs/demo.yaml
	$(VENV)/bin/sweep report demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf sweep-runs sweep.db mlflow.db mlflow.db.champion.lock sweep.db.claims mlruns mlartifacts
