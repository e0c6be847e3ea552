# Everything a user or CI needs, from a fresh clone: `make help`.
SHELL := /bin/bash
PYTHON ?= python3
# pyproject.toml's requires-python: torch 2.14.1 and the pinned stack are tested on 3.11 only.
PYTHON_VERSION := 3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_ROOT ?= outputs
# OpenMP threads that spin while waiting made small steps several times slower whenever the
# two cores are shared (parallel cells, SLURM tasks, the test suite); passive waiting costs
# nothing measurable when a process has the machine to itself.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: help install check-python test test-fast mutate demo lint bench slurm-up slurm-down clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the project with its dev tools

# Re-install when the dependency list changes. torch/torchvision come from the machine's local
# wheel mirror (pip's config); editable_mode=compat puts the repo on sys.path through a .pth,
# which Hydra needs to discover hydra_plugins/ (the project's sweeper).
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory check-python
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

# Before any .venv exists: a venv of the wrong Python would be reused by every later make.
check-python:
	@found=$$($(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null); \
	case "$$found" in $(PYTHON_VERSION)|$(PYTHON_VERSION).*) ;; \
	*) echo "make install: $(PYTHON) is Python $${found:-(not found)}; sae-grid needs Python" \
	        "$(PYTHON_VERSION). Fix: make install PYTHON=python$(PYTHON_VERSION)" >&2; exit 1;; esac
	@if [ -e $(PY) ]; then found=$$($(PY) -c 'import platform; print(platform.python_version())' \
	    2>/dev/null); case "$$found" in $(PYTHON_VERSION).*) ;; \
	*) echo "make install: $(VENV) holds Python $${found:-(broken)}, not $(PYTHON_VERSION)." \
	        "Fix: rm -rf $(VENV) && make install PYTHON=python$(PYTHON_VERSION)" >&2; exit 1;; \
	esac; fi

test: install  ## the whole suite, SLURM tests included (starts and stops a local cluster)
	$(PY) -m pytest -q

test-fast: install  ## the suite without slow and SLURM tests
	$(PY) -m pytest -q -m "not slow and not slurm"

mutate: install  ## planted bugs (scripts/mutate.py): each must make its tests fail (~3 min)
	$(PY) scripts/mutate.py

demo: install  ## the demo grid on embedded data (CPU, W&B offline), then the report
	WANDB_MODE=$${WANDB_MODE:-offline} SAE_OUTPUT_ROOT=$(DEMO_ROOT) $(PY) -m sae.train -m +sweep=demo
	$(PY) -m sae.report $(DEMO_ROOT)/sweeps/demo

lint: install  ## ruff
	$(VENV)/bin/ruff check .

bench: install  ## the training-step benchmark (quick size)
	$(PY) -m sae.bench step --quick

slurm-up:  ## start a local single-node SLURM cluster (prints the SLURM_CONF to export)
	bash scripts/slurm_local.sh start

slurm-down:  ## stop it
	bash scripts/slurm_local.sh stop

clean:  ## remove outputs (runs, sweeps, caches) -- not the venv
	rm -rf outputs multirun
