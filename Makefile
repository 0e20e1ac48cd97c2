# Two commands do everything on a fresh machine (each installs what it needs into .venv first):
#   make train   - a real small MAT pretraining run: 2 ranks through the deepspeed launcher, embedded corpus, ZeRO-2
#   make test    - the test suite (CPU, real DeepSpeed on 2 gloo ranks); `make test-slow` adds the end-to-end runs
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NUM_RANKS ?= 2
CONFIG ?= configs/bert_mat_zero2.json
ARGS ?=

.PHONY: setup train test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel here, never an unpinned multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet torch==2.13.0 -e '.[test]'
	touch $@

train: setup
	PATH=$(abspath $(BIN)):$$PATH WANDB_MODE=$${WANDB_MODE:-offline} \
	  deepspeed --num_gpus $(NUM_RANKS) --module mat_ds.pretrain --deepspeed_config $(CONFIG) --out_dir runs/default $(ARGS)

test: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest

test-slow: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -m slow

clean:
	rm -rf runs .cache .pytest_cache
