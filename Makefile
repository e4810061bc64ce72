# Two commands for a newcomer: `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs what it needs (CPU torch pinned by constraints.txt).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

$(BIN)/tdm: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,tensorboard]'
	touch $@

.PHONY: demo test bench
demo: $(BIN)/tdm
	$(BIN)/tdm distill --preset digits --output runs/digits

# Lint (ruff check; not ruff format, which would undo the aligned one-line argument comments), then the tests.
test: $(BIN)/tdm
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(BIN)/tdm
	$(BIN)/python benchmarks/toy.py
