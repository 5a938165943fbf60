# The developer's and the newcomer's entry points. `make run`, then `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=
PY_DIRS := forwarder forwarder_sim tests scripts examples $(wildcard bench)

PREFIX  ?= /opt/forwarder
DESTDIR ?=

.PHONY: help run test test-floor check style bench soak soak-fleet clean redis-server test-tools install-dev install uninstall

help:
	@echo "make run     start redis, the upstream simulator and forwarder; live view until Ctrl-C"
	@echo "make test    run the test suite against a real redis-server and the simulator"
	@echo "make test-floor  the Redis writer's tests against the lowest dependency versions declared"
	@echo "make check   ruff format --check, ruff check, mypy --strict"
	@echo "make style   apply ruff's fixes and formatting"
	@echo "make bench   throughput/latency/scale benchmarks (writes bench/results/latest.json)"
	@echo "make soak    ~10 minutes of traffic with Redis faults; prints sent/written/lost"
	@echo "make soak-fleet  3 fleet members, a restart or kill every 20 s (SOAK_FLEET_ARGS=--duration 300)"
	@echo "make install PREFIX=/opt/forwarder DESTDIR=  venv, systemd unit, example config"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install-dev: $(STAMP)

# Tests and the demo need real programs. Install what is missing when we are root and have
# apt-get (CI, containers); otherwise say what to do. $(1): command, $(2): Debian package.
define need
	@command -v $(1) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(2) with apt-get (for $(1))"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2) >/dev/null; \
	  else \
	    echo "$(1) is missing: install it (Debian/Ubuntu: sudo apt-get install $(2))" >&2; \
	    exit 1; \
	  fi; }
endef

redis-server:
	$(call need,redis-server,redis-server)

# promtool (alert rule tests) and systemd-analyze (unit checks) for the deploy tests.
test-tools: redis-server
	$(call need,promtool,prometheus)
	$(call need,systemd-analyze,systemd)

run: $(STAMP) redis-server
	$(BIN)/python scripts/demo.py

test: $(STAMP) test-tools
	$(BIN)/pytest $(PYTEST_ARGS)

# "Test the floor you declare": a throwaway venv with exactly the lowest versions that
# pyproject.toml allows for the runtime dependencies, and the writer's tests run against it.
FLOOR_VENV ?= .venv-floor
FLOOR_TESTS ?= tests/test_sink.py tests/test_acl.py tests/test_durability.py \
  tests/test_redis_target.py tests/test_sentinel.py tests/test_cluster.py
test-floor: $(STAMP) redis-server
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(BIN)/python scripts/floor_requirements.py pyproject.toml > $(FLOOR_VENV)/floor.txt
	$(FLOOR_VENV)/bin/pip install --quiet --disable-pip-version-check -r $(FLOOR_VENV)/floor.txt \
	  'pytest>=8,<10' 'pytest-timeout>=2.3,<3' 'hypothesis>=6.100,<7' 'trustme>=1.1,<2'
	$(FLOOR_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	$(FLOOR_VENV)/bin/pip freeze | grep -i -E '^(redis|hiredis|h11|prometheus.client|orjson|pyjwt)=='
	$(FLOOR_VENV)/bin/pytest -p no:cacheprovider $(PYTEST_ARGS) $(FLOOR_TESTS)

bench: $(STAMP) redis-server
	$(BIN)/python -m bench.run

soak: $(STAMP) redis-server
	$(BIN)/python -m bench.soak

# The fleet variant (`make soak` is the single-process one; run both for a release).
SOAK_FLEET_ARGS ?=
soak-fleet: $(STAMP) redis-server
	$(BIN)/python -m bench.soak_fleet $(SOAK_FLEET_ARGS)

install:
	PREFIX=$(PREFIX) DESTDIR=$(DESTDIR) PYTHON=$(PYTHON) sh scripts/install.sh

uninstall:
	PREFIX=$(PREFIX) DESTDIR=$(DESTDIR) sh scripts/uninstall.sh

check: $(STAMP)
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/mypy $(PY_DIRS)

style: $(STAMP)
	$(BIN)/ruff check --fix $(PY_DIRS)
	$(BIN)/ruff format $(PY_DIRS)

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
