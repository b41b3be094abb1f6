# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,export,bench]"
	touch $@

# `make demo` pretrains on rendered shapes; `make demo DATA=/a/folder` on your images.
demo: setup
	$(PY) -m dinokit demo $(if $(DATA),data=$(DATA))

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) bench/inference.py

clean:
	rm -rf $(VENV) out .pytest_cache
