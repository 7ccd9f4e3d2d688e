# The suite's commands. `make setup` builds .venv; every other target builds it first if missing.
# A cluster user points CONSTRAINTS at a file that pins their CUDA torch (or leaves torch unpinned):
#   make setup CONSTRAINTS=my-constraints.txt
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
# robosuite (robot task) without its dependency list: mink==0.0.5 pins numpy<2 and is not used here;
# its other dependencies are in pyproject's experiments extra.
ROBOSUITE ?= robosuite==1.5.2

.PHONY: equal-time-lm equal-time-lm-lora equal-time-flow equal-time-control equal-time-robot setup test test-all test-slow bench report dashboards clean-venv tune-lm tune-lm-lora tune-robot tune-flow tune-control reproduce-lm reproduce-lm-lora sweep-lm-lr reproduce-flow sweep-flow-lr reproduce-control reproduce-robot sweep-lm-damping sweep-flow-damping sweep-control-damping sweep-robot-damping

SCALE ?= cpu
# SEEDS= (empty): the experiment's own evaluation seeds (configs/experiment/<task>/cpu.yaml); SEEDS=0,1,2 for fewer
SEEDS ?=
# Sweeps run JOBS runs at once, THREADS torch threads each (hydra-joblib-launcher; configs/hydra/launcher/local.yaml):
# on 2 cores two single-threaded runs beat one two-threaded run (docs/experiments.md). LAUNCHER=slurm sends
# each run to Slurm instead; LAUNCHER= (empty) runs them one after another in this process.
LAUNCHER ?= local
JOBS ?= 2
THREADS ?= 1
LM_OPTIMIZERS ?= adamw,dopr_adamw,muon,dopr_muon
# flow and robot also run DoPr-X@10 (dopr_<X>_k10: AP refreshed every 10 steps; secondary, docs/protocol.md)
FLOW_OPTIMIZERS ?= adamw,dopr_adamw,dopr_adamw_k10,muon,dopr_muon,dopr_muon_k10
CONTROL_OPTIMIZERS ?= adamw,dopr_adamw,muon,dopr_muon,signum,dopr_signum,adamuon,dopr_adamuon
# robot: the longest runs (DoPr) first, so that less time is left with one core idle at the end
ROBOT_OPTIMIZERS ?= dopr_muon,dopr_adamw,dopr_muon_k10,dopr_adamw_k10,muon,adamw
LAUNCH := $(if $(LAUNCHER),hydra/launcher=$(LAUNCHER),) $(if $(filter local,$(LAUNCHER)),hydra.launcher.n_jobs=$(JOBS) threads=$(THREADS),)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(ROBOSUITE)
	touch $@

# Fast tests (the default, < 10 minutes on 2 cores). `make test-all` adds the ones marked slow.
test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

# Only the slow tests (a local Slurm cluster: installs Slurm from Debian if missing, root only).
test-slow: setup
	$(PY) -m pytest -q -m slow

# Every page under results/, rebuilt from the committed records (results/<task>/<experiment>/records.jsonl; no run
# folders needed), then the cross-task summary results/README.md. The same records give the same bytes.
report: setup
	$(PY) scripts/report.py --all
	$(PY) scripts/summary.py

# One W&B report per task, built from code (scripts/dashboards.py; needs a W&B login). DRY_RUN=1 writes their
# specs to runs/dashboards/<task>.json instead, with no login and no network.
dashboards: setup
	$(PY) scripts/dashboards.py $(if $(DRY_RUN),--dry-run,)

# Per-step time of each GP with and without AP, and the DoPr-X / X ratios (docs/benchmark.md).
bench: setup
	$(PY) scripts/bench_optimizer.py

clean-venv:
	rm -rf $(VENV)

# make reproduce-<task>: the task's headline experiment (configs/experiment/<task>/cpu.yaml: optimizer x seed), each
# finished run adding its record to results/<task>/<scale>/records.jsonl, then its pages and the cross-task summary.
# Killed? Run it again: finished runs are skipped, the others resume from their checkpoints. reproduce-lm is the
# flagship; control is behaviour cloning on Hopper-v5; robot is a flow-matching policy on robosuite Stack.
define reproduce
reproduce-$(1): setup
	$$(PY) -m experiments.train -m +experiment=$(2)/cpu scale=$$(SCALE) results_dir=results/$(2)/$$(SCALE) \
		hydra.sweep.dir=runs/$(2)/$$(SCALE) optimizer=$$($(3)) $$(if $$(SEEDS),seed=$$(SEEDS),) $$(LAUNCH)
	$$(PY) scripts/report.py results/$(2)/$$(SCALE) --wandb
	$$(PY) scripts/summary.py
endef

# make sweep-<task>-lr: an LR sweep (records: results/<task>/cpu_lr/; its page lr_sweep.md goes to results/<task>/cpu/).
define sweep_lr
sweep-$(1)-lr: setup
	$$(PY) -m experiments.train -m +sweep=$(1)_lr $$(LAUNCH)
	$$(PY) scripts/report.py results/$(1)/cpu_lr --wandb
endef

# make equal-time-<task>: the equal-time arm (scripts/equal_time.py): each X with a DoPr-X in results/<task>/cpu runs
# again on the same seeds for DoPr-X's measured training time, into results/<task>/cpu_equal_time (and for DoPr-X@10's,
# into results/<task>/cpu_equal_time_k10, where the headline evaluation ran it); then the summary.
define equal_time
equal-time-$(1): setup
	$$(PY) scripts/equal_time.py $(2) --launcher "$$(LAUNCHER)" --jobs $$(JOBS) --threads $$(THREADS)
	$$(PY) scripts/summary.py
endef
$(foreach t,lm lm_lora flow control robot,$(eval $(call equal_time,$(subst _,-,$(t)),$(t))))

$(eval $(call reproduce,lm,lm,LM_OPTIMIZERS))
$(eval $(call reproduce,lm-lora,lm_lora,LM_OPTIMIZERS))
$(eval $(call reproduce,flow,flow,FLOW_OPTIMIZERS))
$(eval $(call reproduce,control,control,CONTROL_OPTIMIZERS))
$(eval $(call reproduce,robot,robot,ROBOT_OPTIMIZERS))
# make sweep-<task>-damping: DoPr-AdamW over damping 1e-3..10 at two LRs plus AdamW at both, seed 100
# (records: results/<task>/cpu_damping/; its page damping.md goes to results/<task>/cpu/).
define sweep_damping
sweep-$(1)-damping: setup
	$$(PY) -m experiments.train -m +sweep=$(1)_damping $$(LAUNCH)
	$$(PY) -m experiments.train -m +sweep=$(1)_damping_base $$(LAUNCH)
	$$(PY) scripts/report.py results/$(1)/cpu_damping
endef

# make tune-<task>: the tuning protocol, version 3 (docs/protocol.md; configs/experiment/<task>/cpu_tune.yaml):
# 16 Sobol trials per optimizer and round over 3-D spaces, the best third on three tuning seeds, selection on the
# selection instances, edge extension for every optimizer; writes lr and tuned into configs/task/<task>.yaml and
# the page results/<task>/cpu/tuning.md. Resumable: run it again. LAUNCHER=slurm sends every phase to Slurm.
# (The version-2 grids behind the committed cpu_tune records: configs/sweep/<task>_tune_*.yaml.)
define tune
tune-$(1): setup
	$$(PY) scripts/tune.py $(2)/cpu_tune --launcher "$$(LAUNCHER)" --jobs $$(JOBS) --threads $$(THREADS)
endef
$(eval $(call tune,lm,lm))
$(eval $(call tune,lm-lora,lm_lora))
$(eval $(call tune,robot,robot))
$(eval $(call tune,flow,flow))
$(eval $(call tune,control,control))

$(eval $(call sweep_lr,lm))
$(eval $(call sweep_lr,flow))
$(foreach t,lm flow control robot,$(eval $(call sweep_damping,$(t))))
