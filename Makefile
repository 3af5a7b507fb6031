# One virtual environment per purpose, each installed from its committed lock in locks/ (the
# exact versions CI tested; `make lock` refreshes them). The CPU build of torch is installed
# first, so that nothing later resolves an unpinned torch to a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
MAIN_REQS := -e ".[test,bench]"

# The lowest supported transformers (pyproject.toml), the one NVIDIA kvpress needs, with
# kvpress, checked in an environment of its own.
COMPAT_VENV ?= .venv-compat
COMPAT_REQS := -e ".[test,bench]" transformers==5.2.0 kvpress==0.5.5

# lmms-eval, with the newest transformers, in an environment of its own (it pulls many
# packages). lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed; the index's
# torchvision is a CUDA build that cannot load beside the CPU torch (transformers would import
# it), and nothing here needs it: it is removed after the install, and is not in the lock.
LMMS_VENV ?= .venv-lmms
LMMS_REQS := -e ".[test,lmms]" "filelock<4"
LMMS_REMOVE := torchvision

# The newest releases the ranges in pyproject.toml admit, not locked: an upstream release that
# breaks the library fails `make test` here before it reaches a user.
LATEST_VENV ?= .venv-latest

# $(call install,VENV,LOCK,REQUIREMENTS): a new environment with exactly the lock's versions
# (pip itself included); every package installed is in the lock (tests/test_packaging.py)
define install
	python3 -m venv --clear $(1)
	$(1)/bin/python -m pip install -q -c $(2) pip
	$(1)/bin/python -m pip install -q -c $(2) $(TORCH)
	$(1)/bin/python -m pip install -q -c $(2) $(3)
endef

# $(call newest,VENV,REQUIREMENTS): VENV (made, or upgraded in place) with the newest releases
# the ranges in pyproject.toml admit beside the torch pin
define newest
	python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(TORCH)
	$(1)/bin/python -m pip install -q --upgrade --upgrade-strategy eager $(2) $(TORCH)
endef

# $(call lock,NAME,REQUIREMENTS[,REMOVE]): resolve in a new environment with the newest releases
# the ranges admit, and write what was installed to locks/NAME.txt. Local version labels are
# dropped (torch 2.13.0+cpu is written 2.13.0, which pip matches with the CPU build where the
# index has it); the Python version is written in the header: the pins hold for it.
define lock
	rm -rf .venv-lock
	$(call newest,.venv-lock,$(2))
	.venv-lock/bin/python -m pip check
	$(if $(3),.venv-lock/bin/python -m pip uninstall -q -y $(3))
	{ echo "# the $(1) environment, written by make lock for Python" \
	    "$$(.venv-lock/bin/python -c 'import sys; print(*sys.version_info[:2], sep=".")')"; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | sed -E 's/\+[^+]*$$//'; \
	} > locks/$(1).txt
	rm -rf .venv-lock
endef

.PHONY: setup demo test test-compat test-lmms test-latest lock kvpress lmms lint bench bench-peers \
	gpu-check aot

$(VENV)/.installed: pyproject.toml locks/main.txt
	$(call install,$(VENV),locks/main.txt,$(MAIN_REQS))
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m csp_inductor demo

test: setup
	CSP_LOCK=locks/main.txt $(PY) -m pytest
	$(MAKE) test-compat
	$(MAKE) test-lmms
	$(MAKE) test-latest

$(COMPAT_VENV)/.installed: pyproject.toml locks/compat.txt
	$(call install,$(COMPAT_VENV),locks/compat.txt,$(COMPAT_REQS))
	touch $@

# the backend, conversations, the bound, the re-read, the built-in model and the family matrix
# (eagerly; compiled: two families) on the lowest supported transformers; the kvpress bridge
test-compat: $(COMPAT_VENV)/.installed
	CSP_LOCK=locks/compat.txt $(COMPAT_VENV)/bin/python -m pytest tests/test_packaging.py \
		tests/test_backend.py tests/test_families.py \
		tests/test_conversation.py tests/test_bounded.py tests/test_reread.py tests/test_stream.py \
		tests/test_layers.py \
		tests/test_builtin_model.py tests/test_compat.py tests/test_family_matrix.py \
		tests/test_kvpress.py \
		-k "not compiled_is_exact or llava or gemma3"

$(LMMS_VENV)/.installed: pyproject.toml locks/lmms.txt
	$(call install,$(LMMS_VENV),locks/lmms.txt,$(LMMS_REQS))
	$(LMMS_VENV)/bin/python -m pip uninstall -q -y $(LMMS_REMOVE)
	touch $@

# the lmms-eval model and the local task (from the repository's root: the task's data path)
test-lmms: $(LMMS_VENV)/.installed
	CSP_LOCK=locks/lmms.txt $(LMMS_VENV)/bin/python -m pytest tests/test_packaging.py \
		tests/test_lmms_eval.py

# upgraded on every run, so a local environment follows upstream as CI's new one does; a short
# smoke: the layout and packaging, the built-in model, the backend, the model families and the
# support check
test-latest:
	$(call newest,$(LATEST_VENV),-e ".[test]")
	$(LATEST_VENV)/bin/python -m pytest tests/test_packaging.py tests/test_builtin_model.py \
		tests/test_backend.py tests/test_families.py tests/test_check.py

# refresh the locks: each environment resolved anew from the newest releases its ranges admit
lock:
	$(call lock,main,$(MAIN_REQS))
	$(call lock,compat,$(COMPAT_REQS))
	$(call lock,lmms,$(LMMS_REQS),$(LMMS_REMOVE))

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
