# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
# Python caches compiled modules (__pycache__, git-ignored) unless told not to; some machines
# tell it not to (PYTHONDONTWRITEBYTECODE=1), and then every process the tests, the demo and
# the benchmarks start compiles every module of the project again: about 0.25 s of CPU per
# process, over hundreds of processes.
unexport PYTHONDONTWRITEBYTECODE
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint types unit bench proto clean debian-packages js-client

# Create the virtual environment when it is missing or pyproject.toml changed. uv (from
# PyPI) installs the same versions as pip in about a quarter of the time (14 s against
# 53 s here), trusting the system's certificate store as pip does; pip does it where uv
# cannot (uv reads neither pip.conf nor PIP_INDEX_URL: behind a private index, set
# UV_INDEX_URL too).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if $(BIN)/python -m pip install --quiet 'uv>=0.13,<0.14' \
		&& UV_NATIVE_TLS=1 $(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]'; then :; \
	else $(BIN)/python -m pip install --quiet -e '.[dev]'; fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gateway demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

types: $(STAMP)
	$(BIN)/mypy gateway security_server registry certs gateway_cli gateway_demo gateway_ops gateway_client tests

unit: $(STAMP)
	$(BIN)/pytest tests/unit

# `make test` runs the tests marked `serial` (timings, latency ratios) first, alone on the
# machine, then every other test in PYTEST_WORKERS processes (pytest-xdist), each test file
# kept whole in one worker so that its module-scoped topology starts once. Most of the
# integration tests' time is spent waiting on their subprocesses, so more workers than
# cores pay. `PYTEST_WORKERS=0 make test` runs everything in one process.
PYTEST_WORKERS ?= 4

test: debian-packages js-client lint types $(STAMP)
	$(BIN)/pytest -m serial -p no:xdist || [ $$? -eq 5 ]  # 5: no test is marked serial
	$(BIN)/pytest -m "not serial" -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# The grpc-js client of the interoperability tests (tests/interop/js), from the npm
# registry at the versions of its package-lock.json; without npm it says so, and the test
# needing it skips.
JS := tests/interop/js
JS_STAMP := $(JS)/node_modules/.installed

js-client: $(JS_STAMP)

$(JS_STAMP): $(JS)/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix $(JS) --no-audit --no-fund --loglevel=error && touch $(JS_STAMP); \
	else echo "npm is missing: the grpc-js interoperability test will skip"; fi

# The Debian packages the tests use (openssl, prometheus), installed when missing and when
# run as root with apt-get; otherwise it says why, and the tests needing them skip.
debian-packages:
	@scripts/debian-packages

bench: debian-packages $(STAMP)
	$(BIN)/gateway bench --repeats 5
	$(BIN)/gateway bench --revocation --repeats 5 --workdir var/bench-revocation
	$(BIN)/gateway bench --audit --records 1000000 --repeats 3 --queries 300
	$(BIN)/gateway bench --federation --repeats 5 --workdir var/bench-federation
	$(BIN)/gateway bench --scale 0.1 --repeats 3 --workdir var/bench-scale
	$(BIN)/gateway bench --streams --repeats 3 --seconds 5 --workdir var/bench-streams

# Regenerate the committed protobuf modules from proto/ (tests check they match).
proto: $(STAMP)
	$(BIN)/python scripts/genproto.py

clean:
	rm -rf var build *.egg-info .mypy_cache .ruff_cache .pytest_cache
