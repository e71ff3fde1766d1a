# Two commands set up a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on a CPU machine (on a GPU
# machine the same pin gives the CUDA build), and deepspeed's build needs torch already installed.
TORCH ?= torch==2.13.0
# seconds the DeepSpeed op build may take, waiting on another build's lock included (it takes about a minute on 2 cores)
OP_BUILD_TIMEOUT_S ?= 1200

.PHONY: install demo test bench clean slurm

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the tests' reference preset takes CLIP's BPE vocabulary from the open_clip wheel; its
	# dependencies (timm, torchvision) are not needed for that file and would pull another torch
	$(BIN)/python -m pip install -q --no-deps open-clip-torch==3.3.0
	# DeepSpeed compiles its CPU shared-memory op at first use; build it now, not inside a job or a test. A build killed
	# half-way leaves torch's lock file behind, on which torch would wait for ever: a lock older than 900 s stops it, named
	timeout $(OP_BUILD_TIMEOUT_S) $(BIN)/python -m revprompt.training.engine \
	  || { echo "DeepSpeed's CPU op build failed or did not finish in $(OP_BUILD_TIMEOUT_S) s. If it was stopped half-way, remove its lock $$($(BIN)/python -c 'from revprompt.training.engine import op_build_lock; print(op_build_lock())') (when no other build runs) and run make again" >&2; exit 1; }
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/revprompt pipeline --config tiny

test: install slurm
	$(BIN)/lint-imports --no-cache   # the layering contract in pyproject.toml
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests

# Debian's Slurm and munge for tests/slurm, when missing and when we may install them
slurm:
	@sh tests/slurm/install.sh

bench: install
	$(BIN)/python benchmarks/generation_overhead.py
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/loader_throughput.py
	$(BIN)/python benchmarks/loader_s3.py --batches 30

clean:
	rm -rf runs/tiny
