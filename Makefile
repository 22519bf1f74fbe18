# make demo  -- set up .venv and run the whole pipeline on the built-in small dataset
# make test  -- set up .venv and run the test suite
# make bench -- set up .venv and run the benchmarks behind BENCHMARKS.md
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m resnet_imagenet demo

test: $(STAMP)
	$(VENV)/bin/lint-imports
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

bench: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash benchmarks/run_all.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check resnet_imagenet tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info
