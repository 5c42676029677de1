# diffpath: the two commands of the README are `make repro` and `make test`.
# Both create the virtual environment at .venv/ on first use, installing exactly the
# lock file requirements/cpu.lock.txt (CPU PyTorch); `make lock` refreshes the lock.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The locks: every package with its exact version and sha256 hashes (pip-compile output).
LOCK     := requirements/cpu.lock.txt
GPU_LOCK := requirements/paper-gpu.lock.txt
# The installer and the lock tool are pinned too.
PIP_PIN       := pip==26.3
PIP_TOOLS_PIN := pip-tools==7.6.2
LOCK_TOOLS    := $(VENV)/.lock-tools
# `make lock` keeps every pin that still satisfies the inputs; to move versions:
#   make lock LOCK_ARGS=--upgrade                      (everything)
#   make lock LOCK_ARGS="--upgrade-package pillow"     (one package)
LOCK_ARGS ?=
COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOLS)/bin/pip-compile --quiet \
	--generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	$(LOCK_ARGS)

.PHONY: setup setup-gpu system-deps test-deps repro test test-slow paper lab site lock clean-venv

# Installs the lock and nothing else (--no-deps: pip resolves nothing; --require-hashes:
# every file is checked), then the project itself. The stamp records the lock's sha256:
# an unchanged lock is not reinstalled, a changed one is.
define install_lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_PIN)
	$(PY) -m pip install -q --require-hashes --no-deps -r $(1)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	$(PY) -m ipykernel install --sys-prefix --name diffpath --display-name "Python (diffpath)" >/dev/null
	sha256sum $(1) > $(STAMP)
endef

$(STAMP): $(LOCK) pyproject.toml
	$(call install_lock,$(LOCK))

system-deps:
	@test -d $(FMNIST) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

setup: system-deps $(STAMP)

## the paper profile's GPU environment (x86_64, CUDA torch 2.14.1 + torchvision 0.29.1)
setup-gpu: system-deps
	$(call install_lock,$(GPU_LOCK))

## the main job: rebuild every table, figure and page of the embedded profile (one line per stage
## that runs, with its wall time; about 20 minutes on 2 CPU cores from scratch)
repro: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro --quiet

## the study's pages (reports/site/index.html) from the executed notebooks, without rerunning them
site: setup
	$(PY) -m diffpath.study.site --notebooks reports/notebooks --out reports/site

## what the browser test needs: Chromium and its driver from Debian (where they cannot be
## installed, the test is skipped and says why)
test-deps:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; } || \
		echo "make: chromium and chromium-driver could not be installed; the browser test will be skipped"

## the test suite (about 5 minutes on 2 CPU cores)
test: setup test-deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -n 2 -p no:cacheprovider

## the slow tests too (full pipelines in scratch clones, DVC remotes and queued sweeps: minutes)
test-slow: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -n 2 -p no:cacheprovider -m slow

## the paper profile (needs the internet, a GPU, and the weights; see README): checks, then repro
## Installs torchvision (built for the installed torch) and gdown, fetches the model and the data,
## switches params.yaml/dvc.lock to the paper profile, runs dvc repro; offline it lists what is missing.
## Options: NO_GPU=1, MODEL=<local .pt | diffusers folder | hub id | zoo name>, DATA_ROOT=<folder>
paper: setup
	$(PY) -m diffpath.study.profiles paper $(if $(NO_GPU),--no-gpu) $(if $(MODEL),--model "$(MODEL)") $(if $(DATA_ROOT),--data-root "$(DATA_ROOT)")
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

## JupyterLab on notebooks/, with the project's kernel "Python (diffpath)" (.venv's Python);
## .jupyter/jupyter_server_config.py makes every save write the notebook as committed (no outputs,
## the committed metadata), so running a notebook leaves git status and dvc status clean
LAB_ARGS ?=
LAB_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
lab: setup
	$(PY) -m ipykernel install --sys-prefix --name diffpath --display-name "Python (diffpath)"
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m jupyterlab --config=.jupyter/jupyter_server_config.py \
		--ServerApp.root_dir=notebooks $(LAB_ROOT) $(LAB_ARGS)

## refresh the locks from pyproject.toml and requirements/*.in (needs the package index;
## about 10 minutes each); then update environment.yml's pins and run tests/test_environment.py
lock:
	test -x $(LOCK_TOOLS)/bin/pip-compile || { python3 -m venv $(LOCK_TOOLS) && \
		$(LOCK_TOOLS)/bin/pip install -q $(PIP_PIN) $(PIP_TOOLS_PIN); }
	$(COMPILE) --extra study --extra dev -o $(LOCK) pyproject.toml requirements/cpu.in
	$(COMPILE) --extra study --extra dev --extra paper -o $(GPU_LOCK) pyproject.toml requirements/paper-gpu.in

clean-venv:
	rm -rf $(VENV)
