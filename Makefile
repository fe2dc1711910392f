# The two commands that matter: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
# Tools the tests need (grpcurl) are installed here, outside the repository.
TOOLS_DIR ?= $(HOME)/.cache/cdp-tools
GRPCURL_VERSION ?= v1.9.3
export PATH := $(TOOLS_DIR)/bin:$(PATH)

.PHONY: help run build test check fmt lint unit e2e tools clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

run: ## Start the whole platform in one process (embedded log and store, gRPC on 127.0.0.1:50051).
	$(CARGO) run --release -p cdp -- dev

build: ## Build every crate and binary.
	$(CARGO) build --workspace --all-targets

fmt: ## Format the code.
	$(CARGO) fmt --all

lint: ## Check formatting and clippy (warnings are errors).
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

tools: ## Install the test tools (grpcurl) into $(TOOLS_DIR).
	@if ! command -v grpcurl >/dev/null 2>&1; then \
		echo "installing grpcurl $(GRPCURL_VERSION) into $(TOOLS_DIR)/bin"; \
		GOBIN=$(TOOLS_DIR)/bin go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION); \
	fi

test: lint tools build ## Build everything and run every test (unit, property, conformance, end-to-end).
	CDP_REQUIRE_GRPCURL=1 $(CARGO) test --workspace

clean: ## Remove build output and local data.
	$(CARGO) clean
	rm -rf data
