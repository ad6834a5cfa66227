# `make demo` and `make test` set everything up on a fresh machine (Python 3.11+, pip, no GPU needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TINY_MODEL := .cache/tiny-model
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint tiny-model clean

setup: $(STAMP) $(TINY_MODEL)/config.json

# XTuner 0.2.0's own pins do not import together with current torch (see requirements.txt):
# torch 2.14.1 + torchvision 0.29.1 first, then XTuner without its deps, then what it really needs.
$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-deps xtuner==0.2.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q -e '.[dev]'
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
