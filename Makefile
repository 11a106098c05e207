# kitspipe: every stage as a make target. Stage targets are the files the stage writes, so
# `make preprocess` reruns nothing that is up to date (kitspipe also checks content hashes).
#
#   make demo                      the whole pipeline on the built-in synthetic dataset
#   make test                      install, then run the test suite
#   make preprocess DATA=/data/kits19 WORK=work PRESET=paper
#   make train FOLD=2              one fold;  make cv  all five
#
# GPU users: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"

PYTHON ?= python3
TORCH ?= torch==2.13.0
DATA ?= data
WORK ?= work
PRESET ?= cpu
FOLD ?= 0
CASES ?= 10
SEED ?= 0
JOBS ?= 1
KITSPIPE = $(PYTHON) -m kitspipe

DATA_FILES = $(shell find $(DATA) -name '*.nii.gz' 2>/dev/null | sort)

TRAINER ?= DualResolutionTrainer
IN ?= $(DATA)
OUT ?= $(WORK)/predictions
FOLDS ?= 0
DEMO ?= demo
# bf16 autocast for train and infer: auto, bf16 or off (empty: the plan's setting).
MIXED_PRECISION ?=
PRECISION_FLAG = $(if $(MIXED_PRECISION),--mixed-precision $(MIXED_PRECISION))
# Test-time mirroring axes for infer, e.g. "z x", or none (empty: the plan's setting).
MIRROR_AXES ?=
MIRROR_FLAG = $(if $(MIRROR_AXES),--mirror-axes $(filter-out none,$(MIRROR_AXES)))
PREPROCESSED = $(WORK)/preprocessed/manifest.json
# nnU-Net v2 for the side-by-side benchmarks lives in a virtual environment of its own: its
# dependencies (timm -> torchvision) require a newer torch than the project's pinned CPU build.
BENCH_VENV ?= .venv-bench
NNUNET ?= nnunetv2==2.8.1
# A torch to install in that environment first, e.g. the CPU wheel:
# BENCH_TORCH="torch==2.14.1 --index-url https://download.pytorch.org/whl/cpu" (empty: what nnunetv2 pulls).
BENCH_TORCH ?=

.PHONY: install test demo synth check fingerprint show-fingerprint plan preprocess train cv infer evaluate \
	cv-folds bench bench-venv bench-nnunet clean-work report

install:
	$(PYTHON) -m pip install --quiet $(TORCH)
	$(PYTHON) -m pip install --quiet -e ".[test]"

test: install
	$(PYTHON) -m pytest -q tests

demo: install
	$(KITSPIPE) demo --work $(DEMO)

synth:
	$(KITSPIPE) synth $(DATA) --cases $(CASES) --seed $(SEED)

check:
	$(KITSPIPE) check $(DATA) -j $(JOBS)

fingerprint: $(WORK)/fingerprint.json
$(WORK)/fingerprint.json: $(DATA_FILES)
	$(KITSPIPE) fingerprint $(DATA) --work $(WORK) -j $(JOBS)

show-fingerprint: $(WORK)/fingerprint.json
	$(KITSPIPE) fingerprint --show $(WORK)

plan: $(WORK)/plans.json
$(WORK)/plans.json: $(WORK)/fingerprint.json plans/$(PRESET).json
	$(KITSPIPE) plan $(WORK) --preset $(PRESET)

preprocess: $(WORK)/preprocessed/manifest.json
$(WORK)/preprocessed/manifest.json: $(WORK)/plans.json
	$(KITSPIPE) preprocess $(WORK) -j $(JOBS)

# Training targets always ask kitspipe, which resumes an unfinished fold and says so when a fold
# is already complete (a checkpoint file alone cannot tell make whether training finished).
train: $(PREPROCESSED)
	$(KITSPIPE) train $(WORK) --fold $(FOLD) --trainer $(TRAINER) --resume auto $(PRECISION_FLAG)

# Folds are independent jobs: `make -j 5 cv-folds` trains them in parallel; `make cv` then
# predicts each fold's held-out cases and evaluates (training only what is not finished).
CV_FOLDS = 0 1 2 3 4
cv-folds: $(addprefix fold-,$(CV_FOLDS))
fold-%: $(PREPROCESSED)
	$(KITSPIPE) --no-progress train $(WORK) --fold $* --trainer $(TRAINER) --resume auto $(PRECISION_FLAG)

cv: $(PREPROCESSED)
	$(KITSPIPE) cv $(WORK) --trainer $(TRAINER) -j $(JOBS)

infer:
	$(KITSPIPE) infer $(WORK) $(IN) $(OUT) --folds $(FOLDS) --trainer $(TRAINER) $(PRECISION_FLAG) $(MIRROR_FLAG)

evaluate:
	$(KITSPIPE) evaluate $(OUT) $(IN)

report:
	$(KITSPIPE) report $(WORK)

bench:
	$(PYTHON) bench/preprocess.py
	$(PYTHON) bench/train_step.py
	$(PYTHON) bench/infer.py
	$(PYTHON) bench/whole_case_inference.py --amp

# The same benchmarks with nnU-Net's preprocessing, predictor and training step side by side
# (same run, same torch). The stamp names what was installed, so that changing NNUNET or
# BENCH_TORCH, or an install that failed half-way, installs again.
BENCH_STAMP = $(BENCH_VENV)/.installed-$(subst /,_,$(subst :,_,$(subst $(space),_,$(NNUNET)_$(BENCH_TORCH))))
space := $(empty) $(empty)
bench-venv: $(BENCH_STAMP)
$(BENCH_STAMP):
	$(PYTHON) -m venv --system-site-packages $(BENCH_VENV)
	$(if $(BENCH_TORCH),$(BENCH_VENV)/bin/python -m pip install --quiet $(BENCH_TORCH))
	$(BENCH_VENV)/bin/python -m pip install --quiet "$(NNUNET)"
	$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps -e .
	rm -f $(BENCH_VENV)/.installed-*
	touch $@

bench-nnunet: bench-venv
	$(MAKE) bench PYTHON=$(BENCH_VENV)/bin/python

clean-work:
	rm -rf $(WORK)
