# modalpeft: `make demo` and `make test` set everything up on a machine with only Python (3.10+) and pip.
# The first `make setup` installs the project into .venv (several GB: torch); later runs are instant until
# pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.modalpeft-setup-stamp
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

PYTEST_ARGS ?=
DEMO_ARGS ?=
MODALITY ?=
BENCH_ARGS ?=

.PHONY: setup demo test bench style

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev]"
	touch $@

demo: setup  ## the embedded end-to-end demo, offline, into outputs/demo/<timestamp> (MODALITY=vision for one section; DEMO_ARGS="--quick")
	$(OFFLINE) $(BIN)/modalpeft demo $(if $(MODALITY),--modality $(MODALITY)) $(DEMO_ARGS)

test: setup  ## the test suite, offline (PYTEST_ARGS="-k cli -x" to narrow it)
	$(OFFLINE) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup  ## the side-by-side benchmarks, ViT-B/16 then Point-MAE, into outputs/bench/<timestamp> (BENCH_ARGS="--quick" for a check)
	$(OFFLINE) $(BIN)/python -m benchmarks $(BENCH_ARGS)

style: setup  ## format and lint (ruff, configured in pyproject.toml)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
