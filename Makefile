# diffpath: the two commands of the README are `make repro` and `make test`.
# Both create the virtual environment at .venv/ (CPU PyTorch) on first use.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps repro test paper clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch; a looser pin would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[study,dev]"
	touch $(STAMP)

system-deps:
	@test -d $(FMNIST) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

setup: system-deps $(STAMP)

## the main job: rebuild every table and figure of the embedded profile
repro: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

## the test suite (about 5 minutes on 2 CPU cores)
test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -n 2 -p no:cacheprovider

## the paper profile (needs the internet, a GPU, and the weights; see README): checks, then repro
paper: setup
	$(PY) -m diffpath.study.profiles paper
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

clean-venv:
	rm -rf $(VENV)
