# Two commands on a fresh machine:  make run  (the main job)  and  make test  (the test suite).
# Each creates .venv with what it needs and installs Debian's dataset-fashion-mnist when missing.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)
FMNIST_DIR := /usr/share/datasets/fashion-mnist
ARGS ?=

.PHONY: run test notebook inspect evaluate references demo check bench env fashion-mnist clean-demo device-payload

env: $(STAMP)

$(STAMP): requirements.txt
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

# Fashion-MNIST for the demo bundle: Debian's package, unless MIA_FASHION_MNIST points at the IDX files.
fashion-mnist:
	@if [ -n "$$MIA_FASHION_MNIST" ] || [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)); \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	  sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST not found: apt-get install dataset-fashion-mnist, or set MIA_FASHION_MNIST to a folder with its IDX files"; exit 1; \
	fi

run: $(STAMP) fashion-mnist
	$(PYTHON) -m mia run $(ARGS)

inspect: $(STAMP) fashion-mnist
	$(PYTHON) -m mia inspect $(ARGS)

# JupyterLab on the project's venv, with a kernel registered under the project's name (opens exp.ipynb).
NB_STAMP := $(VENV)/.notebook-$(shell cksum < requirements-notebook.txt | cut -d' ' -f1)
$(NB_STAMP): $(STAMP) requirements-notebook.txt
	$(PYTHON) -m pip install -q -r requirements-notebook.txt
	$(PYTHON) -m ipykernel install --sys-prefix --name mia --display-name "mia (project venv)"
	rm -f $(VENV)/.notebook-*
	touch $@

notebook: $(NB_STAMP) fashion-mnist
	$(VENV)/bin/jupyter lab exp.ipynb $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

evaluate: $(STAMP) fashion-mnist
	$(PYTHON) -m mia evaluate $(ARGS)

# Reference models for LiRA / RMIA (resumable). The default recipe is the demo victims' own (25 epochs,
# flips only): about 1 h for 8 models x 3 victims on 2 CPU cores, minutes on a GPU.
REF_ARGS ?= --k 8 --epochs 25 --pad 0
references: $(STAMP) fashion-mnist
	$(PYTHON) -m mia references $(REF_ARGS) $(ARGS)

test: $(STAMP) fashion-mnist
	$(PYTHON) -m pytest -q tests $(ARGS)

bench: $(STAMP) fashion-mnist
	$(PYTHON) -m benchmarks $(ARGS)

check: $(STAMP)
	$(PYTHON) -m mia check $(ARGS)

# What benchmarks/device_check.sh needs on a lent GPU machine that cannot download: Fashion-MNIST, in .device/
# (ignored by git; the device tool carries it: carry [".device"]).
device-payload: fashion-mnist
	mkdir -p .device/fmnist
	cp "$${MIA_FASHION_MNIST:-$(FMNIST_DIR)}"/*-ubyte* .device/fmnist/
