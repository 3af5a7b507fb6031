# One virtual environment per checkout. The CPU build of torch is installed first, pinned, so
# that nothing later resolves an unpinned torch to a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

# The lowest supported transformers (pyproject.toml), the one NVIDIA kvpress needs, with
# kvpress, checked in an environment of its own.
COMPAT_VENV ?= .venv-compat
COMPAT_PINS ?= transformers==5.2.0 kvpress==0.5.5

# lmms-eval, with the newest transformers, in an environment of its own (it pulls many packages)
LMMS_VENV ?= .venv-lmms

.PHONY: setup demo test test-compat test-lmms kvpress lmms lint bench bench-peers gpu-check aot

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m csp_inductor demo

test: setup
	$(PY) -m pytest
	$(MAKE) test-compat
	$(MAKE) test-lmms

$(COMPAT_VENV)/.installed: pyproject.toml
	python3 -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install -q $(TORCH)
	$(COMPAT_VENV)/bin/python -m pip install -q -e ".[test]" $(COMPAT_PINS) $(TORCH)
	touch $@

# the backend, conversations, the bound, the re-read, the built-in model and the family matrix
# (eagerly; compiled: two families) on the lowest supported transformers; the kvpress bridge
test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pytest tests/test_backend.py tests/test_families.py \
		tests/test_conversation.py tests/test_bounded.py tests/test_reread.py \
		tests/test_builtin_model.py tests/test_compat.py tests/test_family_matrix.py \
		tests/test_kvpress.py \
		-k "not compiled_is_exact or llava or gemma3"

# lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed; the index's torchvision is
# a CUDA build that cannot load beside the CPU torch (transformers would import it), and
# nothing here needs it
$(LMMS_VENV)/.installed: pyproject.toml
	python3 -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LMMS_VENV)/bin/python -m pip install -q $(TORCH)
	$(LMMS_VENV)/bin/python -m pip install -q -e ".[test,lmms]" "filelock<4" $(TORCH)
	$(LMMS_VENV)/bin/python -m pip uninstall -q -y torchvision
	touch $@

# the lmms-eval model and the local task (from the repository's root: the task's data path)
test-lmms: $(LMMS_VENV)/.installed
	$(LMMS_VENV)/bin/python -m pytest tests/test_lmms_eval.py

# lmms-eval's own command line on the local task: the built-in model with CSP at 20%
lmms: $(LMMS_VENV)/.installed
	$(LMMS_VENV)/bin/lmms-eval --model csp_inductor \
		--model_args pretrained=builtin,policy=csp,budget=0.2 --batch_size 4 \
		--tasks visual_haystack_csp --include_path csp_inductor/evaluation/lmms_tasks

# kvpress and csp_inductor side by side on the built-in model (CSP as a kvpress press, kvpress
# scorers in the backend)
kvpress: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m csp_inductor kvpress

# benchmarks against NVIDIA kvpress, in the environment of test-compat (kvpress needs its
# transformers): per-token decode and end-to-end generate with a kvpress provider
bench-peers: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pip install -q -e ".[bench]" $(COMPAT_PINS) $(TORCH)
	$(COMPAT_VENV)/bin/python -m pytest bench/bench_tokens.py -p no:cacheprovider \
		--benchmark-json bench/results/tokens_peers.json
	$(COMPAT_VENV)/bin/python -m pytest bench/bench_generate.py -p no:cacheprovider \
		--benchmark-json bench/results/generate_peers.json

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) -m pytest bench/ --benchmark-columns=min,median,max --benchmark-sort=name

# on a CUDA machine: GPU-tier tests and GPU benchmarks, each under a time budget (exits at once,
# status 2, without a GPU)
gpu-check:
	python3 bench/gpu_check.py --device-only
	$(MAKE) setup
	$(PY) bench/gpu_check.py

# the ahead-of-time resource table of the Triton kernels (sm_80, sm_90; minutes, no GPU needed)
aot: setup
	$(PY) bench/aot_resources.py
