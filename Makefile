# notebook-operator — `make run` serves the local backend, `make test` runs everything.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
VENV_STAMP := $(VENV)/.installed
NOTEBOOK ?= notebooks/hello.ipynb
LISTEN ?= 127.0.0.1:8000
DATA_DIR ?= .data
CARGO ?= cargo
# Test binaries share one control plane each; the cache folder is built once per version set.
CONTROL_PLANE = $(shell tests/control-plane/build.sh | tail -n 1)

# make dev-cluster NODE=real: a real kubelet with containerd and runc instead of the test kubelet.
NODE ?= test

IMAGE ?= notebook-operator:$(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

.PHONY: help run test lint test-packaging manifests image test-unit test-runner test-local test-e2e control-plane dev-cluster crds fmt lint venv build bench

help:
	@echo "make run            serve the local backend on $(NOTEBOOK) (http://$(LISTEN)/docs/)"
	@echo "make test           every test: unit, runner, local API, end-to-end on a real control plane"
	@echo "make control-plane  build (once) kube-apiserver, kube-controller-manager, kubectl, etcd, helm,"
	@echo "                    kubelet and kube-scheduler (the real node)"
	@echo "make dev-cluster    control plane + test kubelet in the foreground, kubeconfig in .dev-cluster/"
	@echo "                    (NODE=real: a real kubelet, containerd and runc; needs root)"
	@echo "make crds           regenerate crds/notebookrun.yaml, crds/notebookschedule.yaml (the chart's copies, deploy/)"
	@echo "make manifests      regenerate deploy/ from charts/notebook-operator"
	@echo "make image          build the operator image (deploy/Dockerfile; needs a Docker engine)"
	@echo "make bench          the benchmarks of DESIGN.md section 16 -> docs/benchmarks.md (~20 min)"
	@echo "make lint           cargo fmt --check and clippy with warnings denied (part of make test)"

$(VENV_STAMP): src/runner/requirements.txt tests/runner/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r src/runner/requirements.txt -r tests/runner/requirements.txt
	touch $@

venv: $(VENV_STAMP)

build:
	$(CARGO) build --locked

run: $(VENV_STAMP)
	$(CARGO) run --locked --quiet -- local --notebook $(NOTEBOOK) --python $(VENV)/bin/python --data-dir $(DATA_DIR) --listen $(LISTEN)

crds:
	$(CARGO) run --locked --quiet -- crd > crds/notebookrun.yaml
	cp crds/notebookrun.yaml charts/notebook-operator/crds/notebookrun.yaml
	$(CARGO) run --locked --quiet -- crd schedule > crds/notebookschedule.yaml
	cp crds/notebookschedule.yaml charts/notebook-operator/crds/notebookschedule.yaml
	HELM="$(CONTROL_PLANE)/helm" scripts/render-deploy.sh

manifests:
	HELM="$(CONTROL_PLANE)/helm" scripts/render-deploy.sh

image:
	docker build -f deploy/Dockerfile -t $(IMAGE) .

test-packaging:
	KUBEBUILDER_ASSETS="$(CONTROL_PLANE)" $(CARGO) test --locked --test packaging

control-plane:
	@tests/control-plane/build.sh

dev-cluster: $(VENV_STAMP)
	KUBEBUILDER_ASSETS="$(CONTROL_PLANE)" $(CARGO) run --locked --example dev_cluster -- --node $(NODE)

fmt:
	$(CARGO) fmt --check

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

test-unit:
	$(CARGO) test --locked --lib --bins

test-runner: $(VENV_STAMP)
	$(VENV)/bin/python -m pytest tests/runner -q -p no:cacheprovider

test-local: $(VENV_STAMP)
	$(CARGO) test --locked --test api_local

test-e2e: $(VENV_STAMP)
	KUBEBUILDER_ASSETS="$(CONTROL_PLANE)" $(CARGO) test --locked --tests

# DESIGN.md section 16, written to docs/benchmarks.md (up to ~20 min; not part of make test).
# A quick run: BENCH_RUNS=1000 BENCH_STARTS=10 BENCH_LOCAL_RUNS=5 BENCH_WRK_SECONDS=3 make bench
bench: $(VENV_STAMP)
	KUBEBUILDER_ASSETS="$(CONTROL_PLANE)" $(VENV)/bin/python scripts/bench/run.py all

test: $(VENV_STAMP) lint
	$(VENV)/bin/python -m pytest tests/runner -q -p no:cacheprovider
	KUBEBUILDER_ASSETS="$(CONTROL_PLANE)" $(CARGO) test --locked --all-targets
