# diffpath: the two commands of the README are `make repro` and `make test`.
# Both create the virtual environment at .venv/ on first use, installing exactly the
# lock file requirements/cpu.lock.txt (CPU PyTorch); `make lock` refreshes the lock.
# Every target that runs the study first checks that its environment still equals its lock
# (diffpath/study/lockcheck.py: installed versions against the lock, no pip call, well under a
# second) and reinstalls the lock when a locked package differs.

VENV    ?= .venv
PY      := $(VENV)/bin/python
FMNIST  := /usr/share/datasets/fashion-mnist
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The locks: every package with its exact version and sha256 hashes (pip-compile output).
LOCK     := requirements/cpu.lock.txt
GPU_LOCK := requirements/paper-gpu.lock.txt
LOCKCHECK := diffpath/study/lockcheck.py
# The paper profile's environment: with an NVIDIA GPU (`nvidia-smi -L` lists one, or GPU=1 on the
# command line) its own .venv-gpu/ holding the GPU lock (CUDA torch + torchvision + the paper's
# downloaders), so the CPU environment of `make repro` / `make test` is never touched; without one
# (or with NO_GPU=1) the CPU environment .venv/.
NVIDIA_SMI ?= nvidia-smi
GPU      ?= $(shell $(NVIDIA_SMI) -L 2>/dev/null | grep -q '^GPU [0-9]' && echo 1)
ifneq ($(NO_GPU),)
override GPU :=
endif
GPU_VENV   ?= .venv-gpu
PAPER_VENV := $(if $(GPU),$(GPU_VENV),$(VENV))
PAPER_LOCK := $(if $(GPU),$(GPU_LOCK),$(LOCK))
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

.PHONY: setup setup-gpu system-deps test-deps repro test test-slow paper paper-localization paper-compare \
	verify lab site lock clean-venv env-install

# Installs the lock and nothing else (--no-deps: pip resolves nothing; --require-hashes:
# every file is checked), then the project itself, into ENV_DIR, and registers its kernel
# "Python (diffpath)" for JupyterLab; .installed names the lock.
env-install:
	test -x $(ENV_DIR)/bin/python || python3 -m venv $(ENV_DIR)
	$(ENV_DIR)/bin/python -m pip install -q $(PIP_PIN)
	$(ENV_DIR)/bin/python -m pip install -q --require-hashes --no-deps -r $(ENV_LOCK)
	$(ENV_DIR)/bin/python -m pip install -q --no-deps -e .
	$(ENV_DIR)/bin/python -m pip check
	$(ENV_DIR)/bin/python -m ipykernel install --sys-prefix --name diffpath --display-name "Python (diffpath)" >/dev/null
	sha256sum $(ENV_LOCK) > $(ENV_DIR)/.installed

# $(call ensure_env,VENV,LOCK): install LOCK into VENV unless VENV holds exactly it (lockcheck exit 1:
# a locked package differs, or no environment yet); stop with lockcheck's one line when packages the
# lock does not list break the study's imports (exit 2: reinstalling would not remove them).
ensure_env = +@rc=0; if [ -x $(1)/bin/python ]; then $(1)/bin/python $(LOCKCHECK) $(2) || rc=$$?; \
	else echo "$(1): no environment yet; installing $(2)"; rc=1; fi; \
	if [ $$rc = 1 ]; then $(MAKE) --no-print-directory env-install ENV_DIR=$(1) ENV_LOCK=$(2); \
	elif [ $$rc != 0 ]; then exit $$rc; fi

system-deps:
	@test -d $(FMNIST) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

setup: system-deps
	$(call ensure_env,$(VENV),$(LOCK))

## the paper profile's GPU environment .venv-gpu/ (x86_64, CUDA torch 2.14.1 + torchvision 0.29.1);
## `make paper` makes it by itself when nvidia-smi lists a GPU
setup-gpu: system-deps
	$(call ensure_env,$(GPU_VENV),$(GPU_LOCK))

## the main job: rebuild every table, figure and page of the embedded profile (one line per stage
## that runs, with its wall time; 10–20 minutes on 2 CPU cores from scratch)
repro: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc repro --quiet

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
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -n 2 --dist loadscope -p no:cacheprovider

## the slow tests (full pipelines in scratch clones, the paper profile end to end on fakes, DVC remotes and
## queued sweeps: minutes)
test-slow: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -n 2 --dist loadscope -p no:cacheprovider -m slow

## the paper profile (needs the internet, a GPU, and the weights; see README): one command.
## With a GPU: .venv-gpu/ = the GPU lock; without: .venv/ (the downloaders' torchvision and gdown are
## then installed into it, checked, and taken out again if the study's imports break). Fetches the
## model and the data, switches params.yaml/dvc.lock to the profile, runs dvc repro; offline it lists
## what is missing and changes nothing. Options: NO_GPU=1, GPU=1, MODEL=<local .pt | diffusers folder |
## hub id | zoo name> (another model gets its own output roots), DATA_ROOT=<folder>
paper: system-deps
	$(call ensure_env,$(PAPER_VENV),$(PAPER_LOCK))
	$(PAPER_VENV)/bin/python -m diffpath.study.profiles paper $(if $(GPU),,--no-gpu) $(if $(MODEL),--model "$(MODEL)") $(if $(DATA_ROOT),--data-root "$(DATA_ROOT)")
	PATH="$(abspath $(PAPER_VENV))/bin:$$PATH" $(PAPER_VENV)/bin/dvc repro

## the base-model comparison: the paper profile with each model of MODELS (each into its own output
## roots), then the CelebA-vs-ImageNet table beside the published averages (reports/paper-compare/)
MODELS ?= diffpath-celeba32 imagenet64
paper-compare: system-deps
	$(call ensure_env,$(PAPER_VENV),$(PAPER_LOCK))
	for m in $(MODELS); do \
		$(PAPER_VENV)/bin/python -m diffpath.study.profiles paper $(if $(GPU),,--no-gpu) --model "$$m" $(if $(DATA_ROOT),--data-root "$(DATA_ROOT)") && \
		PATH="$(abspath $(PAPER_VENV))/bin:$$PATH" $(PAPER_VENV)/bin/dvc repro || exit $$?; \
	done
	$(PAPER_VENV)/bin/python -m diffpath.study.compare $(MODELS)

## reproducibility: a fresh `dvc repro` of the committed code in a scratch clone, compared file by
## file with the committed results (largest difference per file against its tolerance; README)
## (the clone's own code runs: PYTHONPATH puts it before the checkout's editable install)
VERIFY_DIR ?= .verify
verify: setup
	rm -rf $(VERIFY_DIR) && git clone -q --no-hardlinks . $(VERIFY_DIR)
	cd $(VERIFY_DIR) && PATH="$(abspath $(VENV))/bin:$$PATH" PYTHONPATH="$(abspath $(VERIFY_DIR))" \
		$(abspath $(VENV))/bin/dvc repro --force
	$(PY) -m diffpath.study.verify $(VERIFY_DIR)

## the localisation paper profile: DIVAD on MVTec AD and VisA (needs the data sets on disk, the internet for
## the weights, a GPU; see README): checks, switches params.yaml/dvc.yaml/dvc.lock, then repro; offline it
## lists what is missing. Same environments as `make paper`. Options: NO_GPU=1, GPU=1, MODEL=<Stable
## Diffusion hub id | folder>, DINO=<ViT hub id | folder>, DATA_ROOT=<folder holding
## mvtec_anomaly_detection/ and VisA_20220922/>
paper-localization: system-deps
	$(call ensure_env,$(PAPER_VENV),$(PAPER_LOCK))
	$(PAPER_VENV)/bin/python -m diffpath.study.profiles paper-localization $(if $(GPU),,--no-gpu) $(if $(MODEL),--model "$(MODEL)") $(if $(DINO),--dino "$(DINO)") $(if $(DATA_ROOT),--data-root "$(DATA_ROOT)")
	PATH="$(abspath $(PAPER_VENV))/bin:$$PATH" $(PAPER_VENV)/bin/dvc repro

## JupyterLab on notebooks/, with the project's kernel "Python (diffpath)" (.venv's Python);
## .jupyter/jupyter_server_config.py makes every save write the notebook as committed (no outputs,
## the committed metadata), so running a notebook leaves git status and dvc status clean
LAB_ARGS ?=
LAB_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
lab: setup
	$(PY) -m ipykernel install --sys-prefix --name diffpath --display-name "Python (diffpath)"
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m jupyterlab --config=.jupyter/jupyter_server_config.py \
		--ServerApp.root_dir=notebooks --MultiKernelManager.default_kernel_name=diffpath $(LAB_ROOT) $(LAB_ARGS)

## refresh the locks from pyproject.toml and requirements/*.in (needs the package index;
## about 10 minutes each); then update environment.yml's pins and run tests/test_environment.py
lock:
	test -x $(LOCK_TOOLS)/bin/pip-compile || { python3 -m venv $(LOCK_TOOLS) && \
		$(LOCK_TOOLS)/bin/pip install -q $(PIP_PIN) $(PIP_TOOLS_PIN); }
	$(COMPILE) --extra study --extra dev -o $(LOCK) pyproject.toml requirements/cpu.in
	$(COMPILE) --extra study --extra dev --extra paper -o $(GPU_LOCK) pyproject.toml requirements/paper-gpu.in

clean-venv:
	rm -rf $(VENV) $(GPU_VENV)
