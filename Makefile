# The suite's commands. `make setup` builds .venv; every other target builds it first if missing.
# A cluster user points CONSTRAINTS at a file that pins their CUDA torch (or leaves torch unpinned):
#   make setup CONSTRAINTS=my-constraints.txt
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python

.PHONY: setup test test-all test-slow bench report clean-venv reproduce-lm sweep-lm-lr reproduce-flow sweep-flow-lr reproduce-control

SCALE ?= cpu
SEEDS ?= 0,1,2
LAUNCHER ?=
LM_OPTIMIZERS ?= adamw,dopr_adamw,muon,dopr_muon
FLOW_OPTIMIZERS ?= adamw,dopr_adamw,muon,dopr_muon
CONTROL_OPTIMIZERS ?= adamw,dopr_adamw,muon,dopr_muon,signum,dopr_signum,adamuon,dopr_adamuon
LAUNCH := $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER),)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

# Fast tests (the default, < 10 minutes on 2 cores). `make test-all` adds the ones marked slow.
test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

# Only the slow tests (a local Slurm cluster: installs Slurm from Debian if missing, root only).
test-slow: setup
	$(PY) -m pytest -q -m slow

# The cross-task summary results/README.md, from the per-task reports under results/ (no run folders needed).
report: setup
	$(PY) scripts/summary.py

# Per-step time of each GP with and without AP, and the DoPr-X / X ratios (see README).
bench: setup
	$(PY) scripts/bench_optimizer.py

clean-venv:
	rm -rf $(VENV)

# The flagship: optimizer x seed on the LM task, then the report (results/lm/<scale>/).
# Killed? Run it again: finished runs are skipped, the others resume from their checkpoints.
reproduce-lm: setup
	$(PY) -m experiments.train -m task=lm scale=$(SCALE) optimizer=$(LM_OPTIMIZERS) seed=$(SEEDS) $(LAUNCH)
	$(PY) scripts/report.py --runs runs/lm/$(SCALE) --out results/lm/$(SCALE) --wandb \
		--command "make reproduce-lm SCALE=$(SCALE) SEEDS=$(SEEDS)"
	$(MAKE) report

# The LR sweep behind task.lr in configs/task/lm.yaml (results/lm/cpu/lr_sweep.md).
sweep-lm-lr: setup
	$(PY) -m experiments.train -m +sweep=lm_lr $(LAUNCH)
	$(PY) scripts/report.py --runs runs/lm/lr_sweep --out results/lm/cpu --lr-sweep --wandb --command "make sweep-lm-lr"
	$(MAKE) report

# Flow-matching image generation: optimizer x seed, then results/flow/<scale>/.
reproduce-flow: setup
	$(PY) -m experiments.train -m task=flow scale=$(SCALE) optimizer=$(FLOW_OPTIMIZERS) seed=$(SEEDS) $(LAUNCH)
	$(PY) scripts/report.py --runs runs/flow/$(SCALE) --out results/flow/$(SCALE) --wandb \
		--command "make reproduce-flow SCALE=$(SCALE) SEEDS=$(SEEDS)"
	$(MAKE) report

# The LR sweep behind task.lr in configs/task/flow.yaml (results/flow/cpu/lr_sweep.md).
sweep-flow-lr: setup
	$(PY) -m experiments.train -m +sweep=flow_lr $(LAUNCH)
	$(PY) scripts/report.py --runs runs/flow/lr_sweep --out results/flow/cpu --lr-sweep --wandb --command "make sweep-flow-lr"
	$(MAKE) report

# Behaviour cloning (Hopper-v5 from the committed SAC expert): 8 optimizers x seed, then results/control/<scale>/.
reproduce-control: setup
	$(PY) -m experiments.train -m task=control scale=$(SCALE) optimizer=$(CONTROL_OPTIMIZERS) seed=$(SEEDS) $(LAUNCH)
	$(PY) scripts/report.py --runs runs/control/$(SCALE) --out results/control/$(SCALE) --wandb \
		--command "make reproduce-control SCALE=$(SCALE) SEEDS=$(SEEDS)"
	$(MAKE) report
