# The two commands that matter: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
# Tools the tests need (grpcurl) are installed here, outside the repository.
TOOLS_DIR ?= $(HOME)/.cache/cdp-tools
GRPCURL_VERSION ?= v1.9.3
SEGMENT_PYTHON_VERSION ?= 2.4.0
SEGMENT_NODE_VERSION ?= 3.1.0
PLAYWRIGHT_VERSION ?= 1.65.1
export PATH := $(TOOLS_DIR)/bin:$(PATH)
# The real Segment SDKs the end-to-end tests drive.
export CDP_SDK_PYTHON := $(TOOLS_DIR)/venv/bin/python
export CDP_SDK_NODE_MODULES := $(TOOLS_DIR)/node/node_modules
export CHROMIUM ?= /usr/bin/chromium

.PHONY: help run build test bench bench-identity bench-audience fuzz chaos fmt lint tools infra-up infra-down clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

run: ## Start the whole platform in one process (embedded log and store; gRPC on 127.0.0.1:50051, HTTP on 127.0.0.1:8080).
	$(CARGO) run --release -p cdp -- dev --config cdp.example.toml

build: ## Build every crate and binary.
	$(CARGO) build --workspace --all-targets --bins

fmt: ## Format the code.
	$(CARGO) fmt --all

lint: ## Check formatting and clippy (warnings are errors).
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

tools: ## Install the test tools (grpcurl, the Segment SDKs, playwright-core into $(TOOLS_DIR); Debian's chromium).
	@if ! command -v grpcurl >/dev/null 2>&1; then \
		echo "installing grpcurl $(GRPCURL_VERSION) into $(TOOLS_DIR)/bin"; \
		GOBIN=$(TOOLS_DIR)/bin go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION); \
	fi
	@if ! $(CDP_SDK_PYTHON) -c 'import segment.analytics' >/dev/null 2>&1; then \
		echo "installing segment-analytics-python $(SEGMENT_PYTHON_VERSION) into $(TOOLS_DIR)/venv"; \
		python3 -m venv $(TOOLS_DIR)/venv && \
		$(TOOLS_DIR)/venv/bin/pip install --quiet segment-analytics-python==$(SEGMENT_PYTHON_VERSION); \
	fi
	@if [ ! -d $(CDP_SDK_NODE_MODULES)/@segment/analytics-node ]; then \
		echo "installing @segment/analytics-node $(SEGMENT_NODE_VERSION) into $(TOOLS_DIR)/node"; \
		mkdir -p $(TOOLS_DIR)/node && \
		npm install --silent --no-audit --no-fund --prefix $(TOOLS_DIR)/node @segment/analytics-node@$(SEGMENT_NODE_VERSION); \
	fi
	@if [ ! -d $(CDP_SDK_NODE_MODULES)/playwright-core ]; then \
		echo "installing playwright-core $(PLAYWRIGHT_VERSION) into $(TOOLS_DIR)/node"; \
		mkdir -p $(TOOLS_DIR)/node && \
		npm install --silent --no-audit --no-fund --prefix $(TOOLS_DIR)/node playwright-core@$(PLAYWRIGHT_VERSION); \
	fi
	@if [ ! -x $(CHROMIUM) ]; then \
		echo "installing Debian's chromium (for the console test)"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi

test: lint tools build ## Build everything, start Kafka and Cassandra (deploy/harness), run every test on both back ends, stop them.
	@trap 'deploy/harness/infra.sh down' EXIT; \
	deploy/harness/infra.sh up || exit 1; \
	status=0; \
	echo "== every test, the ignored ones too (they need Kafka, Cassandra, the SDKs, grpcurl or Chromium); end-to-end on the embedded back end"; \
	$(CARGO) test --workspace --no-fail-fast -- --include-ignored --skip distributed_only || status=$$?; \
	if [ $$status = 0 ]; then \
		echo "== the end-to-end journeys again on the distributed back end (Kafka + Cassandra, one process per service)"; \
		CDP_E2E_BACKEND=distributed $(CARGO) test --workspace --no-fail-fast --test flow --test convergence --test crash --test rebuild --test identity --test replay --test view --test http --test access --test tls --test hardening --test privacy --test audience --test chaos -- --include-ignored --skip distributed_only || status=$$?; \
	fi; \
	if [ $$status = 0 ]; then \
		echo "== outages (stops the shared servers, so alone and last)"; \
		CDP_E2E_BACKEND=distributed $(CARGO) test --workspace --test outage --test chaos -- --include-ignored distributed_only || status=$$?; \
	fi; \
	exit $$status

# Seconds of mutation per target of `make fuzz` (after every seed of fuzz/corpus ran).
FUZZ_SECONDS ?= 60

fuzz: ## Fuzz every decoder of untrusted bytes for FUZZ_SECONDS each (release, overflow checks on); findings in fuzz/artifacts/. See fuzz/README.md.
	CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true \
	$(CARGO) run --release -p cdp-fuzz --target-dir target/fuzz -- --seconds $(FUZZ_SECONDS)

# Populations of `make bench` (customers, comma separated), per back end.
BENCH_CUSTOMERS ?= 10000,100000,1000000
BENCH_DISTRIBUTED_CUSTOMERS ?= 10000,100000
# Populations run again with 20 computed traits and 50 segments defined (`--audiences`), each
# compared with the run above at the same population (empty: none). See docs/benchmarks.md.
BENCH_AUDIENCE_CUSTOMERS ?= 100000,1000000
BENCH_DISTRIBUTED_AUDIENCE_CUSTOMERS ?= 100000
# Load offered during the freshness samples on Kafka + Cassandra (events/s): below what the
# JVM servers sharing the machine's cores sustain, so freshness measures latency, not a backlog.
BENCH_DISTRIBUTED_OFFERED ?= 1000

# Kills of `make chaos` per back end, and how long Kafka and Cassandra stay down.
CHAOS_KILLS ?= 50
CHAOS_OUTAGE_SECS ?= 30

chaos: build ## SIGKILL random processes CHAOS_KILLS times under load on both back ends, then stop Kafka and Cassandra CHAOS_OUTAGE_SECS each; prints the kills survived.
	CDP_CHAOS_KILLS=$(CHAOS_KILLS) $(CARGO) test -p cdp-e2e --test chaos -- --nocapture --skip distributed_only
	@trap 'deploy/harness/infra.sh down' EXIT; \
	deploy/harness/infra.sh up || exit 1; \
	CDP_E2E_BACKEND=distributed CDP_CHAOS_KILLS=$(CHAOS_KILLS) $(CARGO) test -p cdp-e2e --test chaos -- --nocapture --skip distributed_only && \
	CDP_E2E_BACKEND=distributed CDP_CHAOS_OUTAGE_SECS=$(CHAOS_OUTAGE_SECS) $(CARGO) test -p cdp-e2e --test chaos -- --nocapture --include-ignored distributed_only

bench: bench-identity bench-audience ## Print the figures on both back ends (ingest, freshness, lookups, replay, rebuild, memory, disk, naive baseline, then with audiences defined); JSON in target/bench/. See docs/benchmarks.md.
	$(CARGO) build --release --workspace --bins
	target/release/cdp-bench --backend embedded --customers $(BENCH_CUSTOMERS)
	$(if $(BENCH_AUDIENCE_CUSTOMERS),target/release/cdp-bench --backend embedded --audiences --customers $(BENCH_AUDIENCE_CUSTOMERS))
	@trap 'deploy/harness/infra.sh down' EXIT; \
	deploy/harness/infra.sh up || exit 1; \
	target/release/cdp-bench --backend distributed --customers $(BENCH_DISTRIBUTED_CUSTOMERS) --offered $(BENCH_DISTRIBUTED_OFFERED) && \
	$(if $(BENCH_DISTRIBUTED_AUDIENCE_CUSTOMERS),target/release/cdp-bench --backend distributed --audiences --customers $(BENCH_DISTRIBUTED_AUDIENCE_CUSTOMERS) --offered $(BENCH_DISTRIBUTED_OFFERED) &&) \
	target/release/cdp-bench --backend distributed --identity --customers 1000

bench-identity: ## Identity-resolution precision, recall, F1 per trap: in memory, then through the running service (docs/identity.md).
	$(CARGO) run --release -p cdp-domain --features testsuite --example bench-identity
	$(CARGO) build --release -p cdp -p cdp-bench --bins
	target/release/cdp-bench --identity --customers 3000

bench-audience: ## What the bench's audiences cost the profile fold, in memory then in the embedded store (no log, no identity worker); target/bench/audience-fold.json, store-fold.json.
	$(CARGO) run --release -p cdp-domain --features testsuite --example bench-audience
	$(CARGO) run --release -p cdp-store --example bench-fold

infra-up: ## Fetch (Maven Central) and start Kafka (KRaft) and Cassandra on 127.0.0.1; cached in ~/.cache/cdp-infra.
	deploy/harness/infra.sh up

infra-down: ## Stop Kafka and Cassandra and clear their data.
	deploy/harness/infra.sh down

clean: ## Remove build output and local data.
	$(CARGO) clean
	rm -rf data
