# Every target that runs code first makes sure .venv is current with pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv train test test-full bench lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]" $(TORCH_PINS)
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(PY) -m ddtas_lightning.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q $(ARGS)

test-full: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

lint: $(STAMP)
	$(PY) -m ruff check ddtas_lightning tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format ddtas_lightning tests benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache
