# Quick start:  make demo   (set up .venv with the CPU torch wheel, run experiments/demo.yaml, write the report)
#               make test   (the default test suite; offline)
# GPU users: install the CUDA build of torch into .venv first, then `make demo TORCH=` (empty: keep that torch).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# test processes (pytest-xdist): every test runs single-threaded (tests/conftest.py), so one worker per core;
# --dist loadfile keeps a module on one worker, so its module-scoped fixtures (a whole study, a model) run once
TEST_WORKERS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo test test-fast test-slurm test-gpu lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install --quiet "$(TORCH)"; fi
	$(PY) -m pip install --quiet -e ".[all,dev]"
	touch $@

demo: install  # fsdfm run picks threads per stage from the free cores (load average): see auto_threads
	$(VENV)/bin/fsdfm run experiments/demo.yaml --executor inline
	$(VENV)/bin/fsdfm samples experiments/demo.yaml
	$(VENV)/bin/fsdfm report experiments/demo.yaml

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slurm and not gpu" tests

lint: install   # pyflakes/pycodestyle errors and the formatting (ruff; settings in pyproject.toml)
	$(VENV)/bin/ruff check fsdfm tests analysis benchmarks
	$(VENV)/bin/ruff format --check fsdfm tests analysis benchmarks

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not slurm and not gpu" tests

test-slurm: install
	bash slurm/start_slurm.sh
	SLURM_CONF=$${SLURM_ROOT:-/tmp/fsdfm-slurm}/slurm.conf $(PY) -m pytest -q -m slurm tests; rc=$$?; bash slurm/stop_slurm.sh; exit $$rc

test-gpu: install   # on a CUDA machine, with the CUDA torch installed (make test-gpu TORCH=)
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
