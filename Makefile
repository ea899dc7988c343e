# parq — the two quickstart commands are `make all` (main job) and `make test`.
#
#   TORCH_VERSION=2.13.0   torch pinned into the venv (default)
#   TORCH_VERSION=system   use the interpreter's own torch (VENV is then ignored:
#                          installs go to that interpreter, e.g. a CUDA machine)
#   TRITON_VERSION=3.9.0   triton pinned into the venv ("none" to skip)
#   TORCHAO_VERSION=0.18.0 torchao pinned into the venv ("none" to skip; its tests then skip)
#   TRANSFORMERS_VERSION=5.25.0  transformers + accelerate (ACCELERATE_VERSION=1.16.0) for
#                          examples/llm_qat.py ("none" to skip; its test then skips); installed
#                          with the torch present pinned, so they never replace it
#   RUFF_VERSION=0.17.6    ruff for make lint (pinned: its rules and format change)
#   PYTHON=python3         interpreter that creates the venv
SHELL := /bin/bash
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.9.0
TORCHAO_VERSION ?= 0.18.0
TRANSFORMERS_VERSION ?= 5.25.0
ACCELERATE_VERSION ?= 1.16.0
SAFETENSORS_VERSION ?= 0.8.0
RUFF_VERSION ?= 0.17.6
VENV ?= .venv

ifeq ($(TORCH_VERSION),system)
PY := $(PYTHON)
else
PY := $(VENV)/bin/python
endif
PIP := $(PY) -m pip

.PHONY: all setup build test test-levels bench demo lint clean check-portable check-arm gpu-check triton-aot

all: build bench demo

$(VENV)/.created:
ifneq ($(TORCH_VERSION),system)
	$(PYTHON) -m venv $(VENV)
	touch $@
endif

setup: $(VENV)/.created
ifneq ($(TORCH_VERSION),system)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
endif
	$(PY) -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" \
		|| $(PIP) install --quiet "setuptools>=77"  # SPDX license string (PEP 639)
ifneq ($(TRITON_VERSION),none)
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install --quiet "triton==$(TRITON_VERSION)"
endif
	$(PIP) install --quiet pytest pytest-benchmark "ruff==$(RUFF_VERSION)" scikit-learn tqdm matplotlib ninja numpy \
		"safetensors==$(SAFETENSORS_VERSION)"
ifneq ($(TORCHAO_VERSION),none)
	$(PIP) install --quiet "torchao==$(TORCHAO_VERSION)"
endif
ifneq ($(TRANSFORMERS_VERSION),none)
	$(PIP) install --quiet "transformers==$(TRANSFORMERS_VERSION)" \
		"accelerate==$(ACCELERATE_VERSION)" "torch==$$($(PY) -c 'import torch; print(torch.__version__)')"
endif

# The editable install rebuilds the whole extension (minutes): `make build` always redoes
# it; targets that only need an install as new as the sources depend on INSTALL_STAMP.
INSTALL_STAMP := $(if $(filter system,$(TORCH_VERSION)),build,$(VENV))/.parq-installed
EXT_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

build: setup
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "from parq_kernels import backends; print('parq backends (cpu):', backends.availability('cpu'))"
	mkdir -p $(dir $(INSTALL_STAMP)) && touch $(INSTALL_STAMP)

$(INSTALL_STAMP): $(EXT_SOURCES)
	$(MAKE) build

test: build
	$(PY) -m pytest tests -q

# The CPU kernels' tests again at the x86-64 baseline level (SPEC §14; torch too, through
# its variable): the suite above ran them at this CPU's level, and tests/test_cpu_levels.py
# checks every level this CPU runs against the baseline bit for bit.
CPU_KERNEL_TESTS := tests/test_cpu_backend.py tests/test_fused_step_backends.py \
	tests/test_cpu_level_search.py tests/test_cpu_step_loop.py tests/test_cpu_update_paths.py \
	tests/test_export_ops.py tests/test_diffq_ops.py tests/test_fused_step.py
test-levels: $(INSTALL_STAMP)  # (after make test: no second build)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest $(CPU_KERNEL_TESTS) -q -k "not triton and not cuda"

# where make all / bench / demo write their results: a git-ignored folder, so that a run
# leaves the checkout clean (committed runs are copied to benchmarks/results/ by hand)
RESULTS ?= benchmarks/results/local

bench: build
	mkdir -p $(RESULTS)
	$(PY) -m benchmarks --quick --out $(RESULTS)

demo: build
	mkdir -p $(RESULTS)
	$(PY) examples/qat_digits.py --out $(RESULTS)
	$(PY) examples/diffq_digits.py --out $(RESULTS)

# one build runs on older CPUs: the fused step under qemu-user as Nehalem (x86-64 baseline)
# and Haswell (AVX2) against the reference (SPEC.md §14; needs apt-get install qemu-user)
check-portable: build
	$(PY) -m benchmarks.portable_check

# The aarch64 (NEON) build, cross-compiled here and tested under qemu-user (root, Debian 12,
# ~0.5 GB of downloads, ~15 min): tools/arm_qemu/check.sh. ARM_WORKDIR keeps its downloads.
ARM_WORKDIR ?= /tmp/parq-arm
check-arm: setup
	PIP="$(if $(filter system,$(TORCH_VERSION)),$(PY),$(CURDIR)/$(PY)) -m pip" \
		tools/arm_qemu/check.sh $(ARM_WORKDIR)

# The first GPU minutes (README): build for the GPU present, warm Triton's cache, the CUDA /
# Triton tests, the quick GPU benchmark; <= 8 min on an H100, results in benchmarks/results.
# On a CUDA machine with torch preinstalled: make gpu-check TORCH_VERSION=system.
# DRY_RUN=1: the same stages on the CPU (Triton interpreter, tiny shapes, no build).
DRY_RUN ?=
gpu-check:
	$(PY) -m benchmarks.gpu_check $(if $(DRY_RUN),--dry-run)

# Every recorded Triton launch compiled for sm_90a and the CUDA sources for sm_90, no GPU
# needed: registers / spills per kernel in benchmarks/results/{triton_aot,cuda_ptxas}_sm90.*
# (RECORD=1: record the Triton tests' launches again first, minutes under the interpreter)
RECORD ?=
triton-aot:
	$(PY) -m benchmarks.triton_aot $(if $(RECORD),--record)
	TRITON_INTERPRET=1 $(PY) -m benchmarks.triton_record_models
	$(PY) -m benchmarks.triton_aot --launches benchmarks/results/triton_launches_models.json \
		--min-tile 1 --name triton_aot_sm90_models
	$(PY) -m benchmarks.nvcc_check

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf build *.egg-info parq_kernels/*.so $(VENV)
