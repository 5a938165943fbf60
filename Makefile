# The developer's and the newcomer's entry points. `make run`, then `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: help run test check style bench clean redis-server install-dev

help:
	@echo "make run     start redis, the upstream simulator and forwarder; live view until Ctrl-C"
	@echo "make test    run the test suite against a real redis-server and the simulator"
	@echo "make check   ruff format --check, ruff check, mypy --strict"
	@echo "make style   apply ruff's fixes and formatting"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install-dev: $(STAMP)

# Tests and the demo need a real redis-server. Install it when missing and we are root
# (CI, containers); otherwise say what to do.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "redis-server is missing: install it (Debian/Ubuntu: sudo apt-get install redis-server)" >&2; \
	    exit 1; \
	  fi; }

run: $(STAMP) redis-server
	$(BIN)/python scripts/demo.py

test: $(STAMP) redis-server
	$(BIN)/pytest $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/ruff format --check forwarder tests scripts
	$(BIN)/ruff check forwarder tests scripts
	$(BIN)/mypy forwarder tests scripts

style: $(STAMP)
	$(BIN)/ruff check --fix forwarder tests scripts
	$(BIN)/ruff format forwarder tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
