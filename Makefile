# mkonnx — every target sets up what it needs; `make help` lists them.
#
#   make demo    set up (if needed), then convert + evaluate the built-in demo run
#   make test    set up (if needed), build the fixtures (cached), run every test
#
# Set-up installs only from the registries: a project-local Python environment (.venv) for
# libtorch, ONNX Runtime and the reference world, and a release build of mkonnx linked to it.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
MKONNX := target/release/mkonnx
# Tests and benches give libtorch and ONNX Runtime one thread each (2 shared cores).
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
RUST_TEST_THREADS ?= 1

.PHONY: help setup build demo test fixtures bench lint fmt clean

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMPS)/venv: reference/requirements.txt
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r reference/requirements.txt
	$(PY) scripts/write-cargo-env.py
	touch $@

.cargo/config.toml: $(STAMPS)/venv scripts/write-cargo-env.py
	$(PY) scripts/write-cargo-env.py

setup: $(STAMPS)/venv .cargo/config.toml build ## Python environment + .cargo/config.toml + release build

build: .cargo/config.toml ## release build of mkonnx and its PyTorch runner (target/release/mkonnx, mkonnx-torch)
	cargo build --release --workspace --bins

fixtures: $(STAMPS)/venv ## build the reference fixtures (cached outside the repo; prints the directory)
	@$(PY) reference/make_fixtures.py | tail -n 1

demo: setup ## convert, evaluate and compare the built-in demo run (writes demo/)
	$(PY) reference/make_fixtures.py --demo demo >/dev/null
	$(MKONNX) build demo/run --dataset-dir demo/triangles_dataset_small --evaluate-converted-model

test: setup ## every test, against fixtures from real torchvision/pycocotools
	MKONNX_FIXTURES=$$($(PY) reference/make_fixtures.py | tail -n 1) \
	  cargo test --release --workspace -- --test-threads=$(RUST_TEST_THREADS)

bench: setup ## benchmarks against their Python peers (ONLY="convert noop" picks sections); results in target/bench/results.md
	MKONNX_FIXTURES=$$($(PY) reference/make_fixtures.py | tail -n 1) \
	  cargo bench --bench bench -- $(ONLY)

lint: .cargo/config.toml ## rustfmt check + clippy -D warnings
	cargo fmt --check
	cargo clippy --release --workspace --all-targets -- -D warnings

# Each fuzz target runs FUZZ_SECONDS from seeds made with the venv's torch (fuzz/corpus/, not
# committed); libFuzzer counts any allocation or RSS over 1 GB as a failure. The harness
# needs nightly features: RUSTC_BOOTSTRAP=1 lets the stable toolchain provide them.
FUZZ_SECONDS ?= 200
FUZZ_TARGETS ?= checkpoint checkpoint_pickle dataset config
.PHONY: fuzz
fuzz: $(STAMPS)/venv .cargo/config.toml ## fuzz the checkpoint, pickle, dataset and config readers, FUZZ_SECONDS (200) each
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	$(PY) fuzz/make_seeds.py
	RUSTC_BOOTSTRAP=1 cargo fuzz build -O
	for t in $(FUZZ_TARGETS); do \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run -O $$t -- -max_total_time=$(FUZZ_SECONDS) \
	    -rss_limit_mb=1024 -malloc_limit_mb=1024 -print_final_stats=1 || exit 1; \
	done

fmt: ## format the code
	cargo fmt

clean: ## remove build outputs, the demo and the Python environment
	rm -rf target $(VENV) $(STAMPS) demo .cargo/config.toml
