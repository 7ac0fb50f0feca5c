# Two entry points on a fresh machine (see README):
#   make demo   set up, fetch pinned assets, compile and run the tweet-sentiment recipe
#   make test   set up and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench

$(BIN)/recipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/recipe

demo: setup
	$(BIN)/recipe fetch gpt2-bpe vader-tweets
	$(BIN)/recipe compile specs/examples/tweet-sentiment.toml
	$(BIN)/recipe run build/tweet-sentiment

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/compile_and_train.py
