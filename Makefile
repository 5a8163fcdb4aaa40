# Veil: `make setup` once on a fresh machine, then `make test`. Everything runs as root.
SHELL := /bin/bash
HOME ?= /root
export PATH := $(HOME)/.cargo/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
VEIL_CACHE ?= /var/cache/veil
export VEIL_CACHE
# Test beds each run an API server, etcd and agents: two at a time fit two cores.
TEST_THREADS ?= 2

.PHONY: setup build lint test test-e2e conformance cluster cluster-down local-cluster helm-docs bench-policy bench-wireguard bench-proxy bench-identity crd clean-testbeds fuzz

setup:
	bash tests/scripts/setup.sh

build:
	cargo build --workspace --bins

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	shellcheck -x tests/kind/*.sh tests/scripts/*.sh
	bash tests/scripts/helm-docs.sh --check

# Unit, netns test bed and chart tests first, then the kind end-to-end tier on its own
# (a three-node cluster beside other test beds would starve both on two cores), then
# Kubernetes' own sig-network conformance specs on a fresh kind cluster.
test: setup lint build
	cargo test --workspace -- --test-threads=$(TEST_THREADS) --skip e2e_kind
	$(MAKE) test-e2e
	$(MAKE) conformance
	bash tests/kind/cluster.sh down

# Without backtraces, the e2e test's error (what failed, with its context chain) is the
# last thing it prints, where a CI log's tail shows it.
test-e2e:
	RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0 cargo test --workspace e2e_kind -- --test-threads=1 --nocapture

# Veil on a kind cluster (1 control-plane, 2 workers) installed by its Helm chart, with
# demo workloads and an L7Policy; prints the KUBECONFIG and commands to try.
cluster: setup build
	bash tests/kind/cluster.sh up

cluster-down:
	bash tests/kind/cluster.sh down

# Kubernetes' own [sig-network] [Conformance] specs (45 on v1.34.4) against Veil on the kind
# cluster (made when absent); last line RESULT conformance. e2e.test, ginkgo and the e2e
# images are built once (about 7 min cold) into the cache. The last step of `make test`.
conformance: setup build
	bash tests/kind/conformance-setup.sh
	bash tests/kind/cluster.sh up
	bash tests/kind/conformance.sh

# The netns test bed as a local cluster (API server, nodes, agents, a pod per node).
local-cluster: setup build
	cargo run -q -p veil-testbed --bin local-cluster -- --nodes 2

# Regenerates charts/veil/README.md from values.yaml and README.md.gotmpl (lint checks it).
helm-docs:
	bash tests/scripts/helm-docs.sh

bench-policy:
	cargo run --release -q -p veil-l7-policy --example bench-policy

# Regenerates charts/veil/crds/ from the Rust types (a test fails when they differ).
crd:
	cargo run -q -p veil-l7-policy --example gen-crd > charts/veil/crds/l7policy.yaml

# Removes test beds left behind by a test process that was killed outright.
clean-testbeds:
	bash tests/scripts/clean-testbeds.sh

# One iperf3 flow pod -> pod across nodes: plain, Veil, wireguard-go; last line RESULT.
bench-wireguard: setup
	cargo build --release --workspace --bins
	cargo run --release -q -p veil-testbed --bin bench-wireguard

# HTTP/1.1 client pod -> server pod across nodes: direct, through Veil's proxy enforcing
# 1000 rules, through nginx and HAProxy as plain reverse proxies; last line RESULT.
bench-proxy: setup
	cargo build --release --workspace --bins
	cargo run --release -q -p veil-testbed --bin bench-proxy

# Issuance throughput of the identity issuer over TLS; last line RESULT.
bench-identity:
	cargo run --release -q -p veil-identity --example bench-identity

# Every fuzz target (mesh-agent/fuzz, l7-policy/fuzz) for FUZZ_RUNS inputs each (default
# 100000), coverage-guided libFuzzer on the stable toolchain; fails on the first crash.
fuzz:
	bash tests/scripts/fuzz.sh
