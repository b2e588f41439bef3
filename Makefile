# Every target installs what it needs into .venv by itself, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test matrix lint dist bench bench-check bench-baseline valgrind soak clean chromium mutation \
	test-proxy-matrix

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m examples.demo

test: $(STAMP) chromium
	$(PY) -m pytest -q

# Issue 18's whole matrix behind etcd's gRPC proxy: 5 client ages x 3 outage sizes x etcd's progress
# notifications off/on, 30 cells, ~3 min (`make test` runs the 6 cells listed in docs/fleet.md).
test-proxy-matrix: $(STAMP)
	AETCDCFG_PROXY_MATRIX=full $(PY) -m pytest tests/test_proxy_exactness.py -q -k clients_of_any_age

# The compatibility matrix around the main pair: a subset of the suite on CPython 3.10, 3.12 and 3.13
# with etcd 3.5, and on this venv's CPython with Debian's etcd 3.4 (.ci/matrix installs what it needs).
matrix: $(STAMP)
	bash .ci/matrix

# The status page's browser test drives Debian's chromium (never Playwright's own browser downloads).
# Installed here when missing and we can (root with apt-get, as on CI); elsewhere that one test skips.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi

lint: $(STAMP)
	$(PY) -m ruff check aetcdcfg tests benchmarks examples
	$(PY) -m ruff format --check aetcdcfg tests benchmarks examples
	$(PY) -m mypy

# The sdist and wheel in dist/, checked as PyPI would (tests/test_dist.py installs and uses the wheel).
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*

bench: $(STAMP)
	$(PY) -m benchmarks

# Instructions per unit of the hot paths, counted by callgrind (deterministic where clocks are not),
# against benchmarks/instructions_baseline.json: fails past the tolerance (docs/benchmarks.md). ~40 s.
bench-check: $(STAMP) valgrind
	$(PY) -m benchmarks.instructions --check

# After a deliberate change to the counts: rewrite the baseline, then commit it saying why.
bench-baseline: $(STAMP) valgrind
	$(PY) -m benchmarks.instructions --update-baseline

# Debian's valgrind, installed here when missing and we can (root with apt-get, as on CI).
valgrind:
	@if ! command -v valgrind >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; fi

soak: $(STAMP)
	$(PY) -m benchmarks.soak --minutes $(or $(MINUTES),10)

# Mutation testing of the core (_fanout, _resume, live, source, _values, _validate) against the fast
# tests that need no etcd; ~25 min on 2 cores. Not part of `make test`. For live.py with its etcd tests:
# make mutation MUTATION_ARGS="--modules live --etcd-tests tests/test_live.py,tests/test_layers.py,tests/test_user_code.py"
mutation: $(STAMP)
	$(PY) -m tests.mutation --jobs 2 $(MUTATION_ARGS)

# The docs site (mkdocs.yml) into site/; --strict: a broken link, a missing reference or a warning fails.
.PHONY: docs
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) .venv-3.* .mypy_cache .ruff_cache .hypothesis dist
