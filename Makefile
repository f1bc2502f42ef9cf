# Quickstart: `make demo` (main job on the embedded default) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24,<26"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

# pytest's exit code 5 (no test collected) is a broken suite, not a pass.
test: $(STAMP)
	$(PY) -m ruff check selmix_dist launch tools tests
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check selmix_dist launch tools tests

bench: $(STAMP)
	$(PY) tools/bench_gain.py
	$(PY) tools/bench_train.py

clean:
	rm -rf runs .pytest_cache
