# Every target installs what it needs into .venv by itself, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m examples.demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check aetcdcfg tests benchmarks examples
	$(PY) -m ruff format --check aetcdcfg tests benchmarks examples
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m benchmarks

soak: $(STAMP)
	$(PY) -m benchmarks.soak --minutes $(or $(MINUTES),10)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .hypothesis
