# The two set-up commands: `make run` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# PyTorch's CPU build of this release lies on this machine kind's disk; asking for it by exact version
# keeps pip from fetching a multi-GB CUDA build.
TORCH  := torch==2.13.0
# SkyPilot, for the tests that validate `skyfabric launch-spec` output with SkyPilot's own schemas. Every
# release that knows `infra:` pins click<8.2, while transformers>=5 needs huggingface_hub>=1.31, which needs
# click>=8.4.2: pip cannot resolve both, so SkyPilot cannot sit in pyproject's test extra. It is installed
# here without its click pin (--no-deps) and then with every other requirement it declares; the schema
# code never touches click.
SKYPILOT := skypilot==0.14.1

.PHONY: run test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps "$(SKYPILOT)"
	$(BIN)/python -c "import importlib.metadata as m; print('\n'.join(r for r in m.requires('skypilot') \
	  if 'extra ==' not in r and not r.startswith('click')))" > $(VENV)/skypilot-requires.txt
	$(BIN)/pip install -q --disable-pip-version-check -r $(VENV)/skypilot-requires.txt
	rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(BIN)/skyfabric up

test: $(STAMP) lint typecheck
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info
