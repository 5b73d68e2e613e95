# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
# Both create or refresh the local virtualenv first; it is rebuilt when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= data
PYTEST_ARGS ?=
# The training extra takes any torch 2.x; CPU machines install this build first (a GPU machine keeps its own).
TORCH ?= torch==2.13.0

.PHONY: run test test-all venv clean screenshots

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "facets needs Python >= 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,training]"
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m facets.flows.cli build \
		--source nectar=tests/data/sources/nectar/data.jsonl \
		--source openhermes=tests/data/sources/openhermes/train.parquet \
		--source ultrafeedback=tests/data/sources/ultrafeedback/train_prefs.jsonl \
		--source chatbot_arena=tests/data/sources/chatbot_arena/train.parquet \
		--source dsp=tests/data/sources/dsp/domain_specific_preference.json \
		--limit 50 --shard-size 16 --data-dir $(DATA_DIR) --seed 0

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# docs/images/*.png of docs/ui.md: a simulated server, its sample deployments, headless Chromium on the UI
screenshots: $(STAMP)
	$(PY) docs/screenshots.py

clean:
	rm -rf $(VENV) build *.egg-info
