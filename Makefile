# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite; CI runs it).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean venv fuzz

venv: $(STAMP)

# torch first, pinned to the CPU wheel on disk, so no range can pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deltazip demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -c "import deltazip.kernels"  # build the native CPU kernel once, before tests run in parallel processes
	$(BIN)/python -m pytest -q

# 10,000 seeded mutations of real artifacts (benchmarks/fuzz_artifacts.py); counts go to benchmarks/RESULTS.md.
# `make test` runs a 600-case slice (tests/test_fuzz_artifacts.py).
FUZZ_SEED  ?= 0
FUZZ_CASES ?= 10000
fuzz: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/fuzz_artifacts.py --seed $(FUZZ_SEED) --cases $(FUZZ_CASES)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .deltazip .pytest_cache
