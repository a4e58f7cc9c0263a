# Fresh-machine entry points: `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed before the project so pip never resolves torch itself (see DEVELOPERS.md).
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: setup test test-slow lint demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,report,serve,lora]"
	touch $@

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check vlmkit tests bench

demo: setup
	$(VENV)/bin/vlmkit demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
