# Accord — the two Quickstart commands are `make demo` and `make test`; each installs
# what it needs (.venv, Accord and its dependencies) by itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The tests run on two pytest-xdist workers (PYTEST_WORKERS=0: in this process, one by
# one). Most integration tests wait (process start-up, lease TTLs, failover) rather than
# compute, so two workers on two cores halve the suite (903 tests: 16 min 53 s one by one,
# 7 min 25 s on two workers, 2026-12-03). --dist loadfile keeps a
# file's tests on one worker: a module's fixtures (one TLS topology, one fuzz cluster)
# start once, and the files' timing-sensitive tests never run against themselves.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

.PHONY: all venv protos check-protos lint typecheck unit integration test demo try bench profile chaos fuzz clean prometheus postgresql nats iptables chaos-net chromium node-deps node-examples nfqueue

all: test

$(STAMP): pyproject.toml | nfqueue
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Link impairment without netem (tools/topology/_impair.py): iptables rules in a network
# namespace (`make iptables`) and a delayer on an NFQUEUE, through the NetfilterQueue
# package, which pip builds against Debian's libnetfilter-queue-dev (hence before the
# venv is made).
nfqueue:
	@{ command -v gcc >/dev/null && test -e /usr/include/libnetfilter_queue/libnetfilter_queue.h; } || { \
	  apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libnetfilter-queue-dev gcc libc6-dev; } || \
	  { echo "nfqueue: could not install Debian's libnetfilter-queue-dev and gcc (needed to build the NetfilterQueue package, used by tools/topology/_delayer.py)"; exit 1; }

# Generated code comes only from here.
protos: $(STAMP)
	$(PY) protos/generate.py

# CI: regenerating must leave no diff.
check-protos: $(STAMP)
	@$(PY) protos/generate.py >/dev/null 2>&1
	@git diff --exit-code --stat -- protos/ || { echo "protos: generated code is stale; run 'make protos' and commit"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- protos/ | grep -v __pycache__)" || { git status --short -- protos/; echo "protos: generated files not committed"; exit 1; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest tests/unit $(XDIST) $(PYTEST_ARGS)

integration: $(STAMP)
	$(PY) -m pytest tests/integration $(XDIST) $(PYTEST_ARGS)

# The metrics test scrapes Accord with a real Prometheus (Debian's package), which it
# starts itself on a free port; the package's own service is stopped and disabled.
prometheus:
	@command -v prometheus >/dev/null || { \
	  apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus && \
	  { service prometheus stop >/dev/null 2>&1 || true; } && \
	  { systemctl disable --now prometheus >/dev/null 2>&1 || true; }; } || \
	  { echo "prometheus: could not install Debian's prometheus package (needed by tests/integration/test_metrics.py)"; exit 1; }

# The PostgreSQL participant tests start their own PostgreSQL server (Debian's package:
# initdb into a temporary directory, a free loopback port); the package's own cluster
# service is stopped and disabled.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql && \
	  { service postgresql stop >/dev/null 2>&1 || true; } && \
	  { systemctl disable --now postgresql >/dev/null 2>&1 || true; }; } || \
	  { echo "postgresql: could not install Debian's postgresql package (needed by the PostgreSQL participant tests)"; exit 1; }

# The relay's tests (tests/integration/test_relay.py) start their own NATS server with
# JetStream (Debian's nats-server package) on a free port; the package's own service, if
# it has one, is stopped and disabled.
nats:
	@command -v nats-server >/dev/null || test -x /usr/sbin/nats-server || { \
	  apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nats-server && \
	  { service nats-server stop >/dev/null 2>&1 || true; } && \
	  { systemctl disable --now nats-server >/dev/null 2>&1 || true; }; } || \
	  { echo "nats: could not install Debian's nats-server package (needed by tests/integration/test_relay.py)"; exit 1; }

# Network namespaces' partitions (tools/topology/_netns.py, tests/integration/test_netns.py,
# test_chaos_net.py, make chaos-net) are iptables rules inside the namespaces (Debian's
# iptables package).
iptables:
	@command -v iptables >/dev/null || test -x /usr/sbin/iptables || { \
	  apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends iptables; } || \
	  { echo "iptables: could not install Debian's iptables package (needed by the network-namespace tests)"; exit 1; }

# The web console's browser test drives Debian's chromium (headless) with playwright-core
# from npm (tests/browser/package-lock.json); playwright downloads no browser of its own.
chromium:
	@test -x /usr/bin/chromium || { \
	  apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } || \
	  { echo "chromium: could not install Debian's chromium package (needed by tests/integration/test_console.py)"; exit 1; }

BROWSER_DIR := tests/browser
$(BROWSER_DIR)/node_modules/.installed: $(BROWSER_DIR)/package.json $(BROWSER_DIR)/package-lock.json
	@command -v npm >/dev/null || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm; } || \
	  { echo "node-deps: node and npm are needed by the console's browser test"; exit 1; }
	cd $(BROWSER_DIR) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

node-deps: $(BROWSER_DIR)/node_modules/.installed

# The Node.js participant and client (tests/integration/test_node.py): @grpc/grpc-js,
# better-sqlite3 12 (built from source by npm when no prebuilt binary can be fetched:
# a few minutes, once) and grpc-health-check, from their committed lock files.
NODE_EXAMPLES := participants/examples/node clients/examples/node
%/node_modules/.installed: %/package.json %/package-lock.json
	@command -v npm >/dev/null || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm; } || \
	  { echo "node-examples: node and npm are needed by the Node.js participant and client"; exit 1; }
	cd $* && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

node-examples: $(NODE_EXAMPLES:%=%/node_modules/.installed)

# The whole suite: generated code fresh, lint, types, then every test.
test: check-protos lint typecheck prometheus postgresql nats iptables chromium node-deps node-examples nfqueue
	$(PY) -m pytest tests $(XDIST) $(PYTEST_ARGS)

# The whole topology on this machine, a workload, a summary.
demo: $(STAMP)
	$(VENV)/bin/accord demo

# The README's "Running the pieces" in one go: servers on free ports in a scratch
# directory, accounts opened, transactions run, every process stopped at the end.
try: $(STAMP)
	bash examples/try.sh

# Every row in interleaved rounds, ratios as median [min-max] (about 10 minutes on 2
# cores). BENCH_QUICK=1: the short version (about 3 minutes), written under
# bench/results/ (not committed) so it never replaces the figures the README quotes.
# A row that failed (exit 1) still leaves a report: the figure and tables are drawn from
# it, then make fails; an interrupted run (130) writes none.
BENCH_OUT = $(if $(BENCH_QUICK),bench/results/quick,bench/results)
bench: $(STAMP)
	status=0; $(PY) -m bench.run --out $(BENCH_OUT).json $(if $(BENCH_QUICK),--quick,) \
		|| status=$$?; \
	if [ $$status -le 1 ]; then \
		$(PY) -m bench.plot $(BENCH_OUT).json $(BENCH_OUT).png && \
		$(PY) -m bench.report $(BENCH_OUT).json --markdown > $(BENCH_OUT).md && \
		echo "README tables: $(BENCH_OUT).md"; \
	fi; exit $$status

# Where a benchmark row's processes spend their CPU (py-spy, native stacks), by layer.
PROFILE_ROW ?= 2pc
profile: $(STAMP)
	$(PY) -m bench.profile --row $(PROFILE_ROW) --out profile-out

# Kill coordinators and participants under load for CHAOS_S seconds, then check the
# history (exit 1 on any violation). The run's files stay in chaos-out/.
CHAOS_S ?= 600
CHAOS_SEED ?= 1
chaos: $(STAMP)
	rm -rf chaos-out
	$(VENV)/bin/accord chaos --duration $(CHAOS_S) --seed $(CHAOS_SEED) \
		--faults kill-coordinator,kill-participant,pause,etcd,power-loss --out chaos-out

# The same with each process on its own host (network namespaces: root, `ip netns` and
# iptables) and a three-member etcd, with network faults: partitions, an owner cut off
# from etcd, a bank holding prepared branches cut off, latency and loss on a link, an
# etcd member killed or cut off. Without network namespaces it says why and fails.
CHAOS_NET_FAULTS ?= partition,partition-one-way,cut-etcd,cut-prepared,latency,loss,kill-etcd-member,partition-etcd-member,kill-coordinator,kill-participant
chaos-net: $(STAMP) iptables
	@reason=$$($(PY) -c "from accord.tools.topology import netns_available as n; print(n() or '')"); \
	  if [ -n "$$reason" ]; then echo "chaos-net: not run (exit 1): $$reason"; exit 1; fi
	rm -rf chaos-net-out
	$(VENV)/bin/accord chaos --net --etcd-members 3 --ttl 5 --duration $(CHAOS_S) \
		--seed $(CHAOS_SEED) --fault-every 3 --faults $(CHAOS_NET_FAULTS) --out chaos-net-out

# Long fuzzing runs: hypothesis against a live coordinator and participant (FUZZ_N
# examples per test; `make test` runs 200), and WAL_FUZZ_N random bit flips,
# truncations and zeroed ranges opened by the WAL's recovery (`make test` runs 2 000).
FUZZ_N ?= 3000
WAL_FUZZ_N ?= 100000
fuzz: $(STAMP)
	ACCORD_WAL_FUZZ_N=$(WAL_FUZZ_N) $(PY) -m pytest -s -p no:cacheprovider --timeout 0 tests/unit/test_wal_fuzz.py $(PYTEST_ARGS)
	ACCORD_FUZZ_N=$(FUZZ_N) $(PY) -m pytest -s -p no:cacheprovider --timeout 0 tests/integration/test_fuzz.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache $(BROWSER_DIR)/node_modules \
		$(NODE_EXAMPLES:%=%/node_modules)
