# The two commands that matter: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
# Tools the tests need (grpcurl) are installed here, outside the repository.
TOOLS_DIR ?= $(HOME)/.cache/cdp-tools
GRPCURL_VERSION ?= v1.9.3
SEGMENT_PYTHON_VERSION ?= 2.4.0
SEGMENT_NODE_VERSION ?= 3.1.0
export PATH := $(TOOLS_DIR)/bin:$(PATH)
# The real Segment SDKs the end-to-end tests drive.
export CDP_SDK_PYTHON := $(TOOLS_DIR)/venv/bin/python
export CDP_SDK_NODE_MODULES := $(TOOLS_DIR)/node/node_modules

.PHONY: help run build test check fmt lint unit e2e tools clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

run: ## Start the whole platform in one process (embedded log and store; gRPC on 127.0.0.1:50051, HTTP on 127.0.0.1:8080).
	$(CARGO) run --release -p cdp -- --config cdp.example.toml dev

build: ## Build every crate and binary.
	$(CARGO) build --workspace --all-targets

fmt: ## Format the code.
	$(CARGO) fmt --all

lint: ## Check formatting and clippy (warnings are errors).
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

tools: ## Install the test tools (grpcurl, the Segment Python and Node SDKs) into $(TOOLS_DIR).
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

test: lint tools build ## Build everything and run every test (unit, property, conformance, end-to-end).
	CDP_REQUIRE_GRPCURL=1 CDP_REQUIRE_SDKS=1 $(CARGO) test --workspace

clean: ## Remove build output and local data.
	$(CARGO) clean
	rm -rf data
