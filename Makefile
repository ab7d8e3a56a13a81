# The two commands a fresh machine needs: `make demo` and `make test`.
# Both create .venv on first use (torch pinned to the build on these machines' disk).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.dmdr-installed
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast lint profile gpu-check paper-tables clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test,eval,hps]" && $(PIP) install -q --no-deps hpsv2==1.2.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py --out runs/demo --overwrite

test: $(STAMP)
	$(PY) -m ruff check dmdr kernels recipes tools tests benchmarks
	$(VENV)/bin/pytest tests -q --durations=30

test-fast: $(STAMP)
	$(VENV)/bin/pytest tests -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check dmdr kernels recipes tools tests benchmarks

profile: $(STAMP)
	$(PY) tools/profile.py

# One CUDA GPU: kernel checks, kernel speed, attention backends, a tiny DMDR run, as one table
# (CPU: the interpreter checks only). flash-attn: pip install -e ".[gpu]" in the venv first.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --out runs/gpu-check

# The paper's Tables 4 and 5 in miniature on the shapes world, 3 seeds (about 25 min on 2 idle cores).
paper-tables: $(STAMP)
	$(PY) benchmarks/paper_tables.py --out runs/paper-tables

clean-venv:
	rm -rf $(VENV)
