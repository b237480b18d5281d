# Two commands for newcomers: `make demo` and `make test`. Both create the venv on first use.
# `make test-fast` skips the tests marked slow (model training, datatrove pipelines, ablations, subprocess runs):
# about a minute on 2 CPU cores, for quick iteration; `make test` stays the full suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out
# Two pytest-xdist workers, a test file each at a time: much of the suite waits on subprocesses, Slurm and Ray.
# (A third worker on two cores was slower: Ray's daemons and tasks starve under that load.)
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# torch is installed first with an exact pin so pip takes a CPU build its configuration offers (wheels on disk)
# instead of a CUDA download; where it offers none, name PyTorch's CPU index:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[test,offline]"
	touch $(STAMP)

demo: setup
	$(BIN)/edu-filter demo -o $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest tests $(PARALLEL) --durations=15

test-fast: setup
	$(BIN)/python -m pytest tests $(PARALLEL) -m "not slow" -q

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
