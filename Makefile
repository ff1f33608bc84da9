# Every target that runs code first makes sure .venv is current with pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv train test test-full bench lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev,weights]" $(TORCH_PINS)
	touch $(STAMP)

venv: $(STAMP) ## create/refresh .venv from pyproject.toml (torch pinned by TORCH_PINS)

train: $(STAMP) ## train once: make train ARGS='experiment=ddtas_cub200 ...'
	$(PY) -m ddtas_lightning.train $(ARGS)

test: $(STAMP) ## fast tests (not marked slow); ARGS passes pytest options
	$(PY) -m pytest -m "not slow" -q $(ARGS)

test-full: $(STAMP) ## every test, slow ones included
	$(PY) -m pytest -q $(ARGS)

# One run prints every step-cost ratio of issue 15 against the static step measured in the same run (meta:
# jvp, exact, head-only, every=k; mmsi/pair_weight jvp), with peak memory and each variant's lower bound,
# then the data-pipeline, miner and evaluation tables (a few minutes on 2 cores; BENCH_FLAGS=--quick: less).
BENCH_FLAGS ?=
bench: $(STAMP) ## step-cost ratios vs the static step, data pipeline, miners, evaluation (BENCH_FLAGS=--quick)
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_meta_step.py $(BENCH_FLAGS)
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_mmsi_step.py $(BENCH_FLAGS)
	$(PY) benchmarks/bench_data.py $(BENCH_FLAGS)
	$(PY) benchmarks/bench_miners.py
	$(PY) benchmarks/bench_eval.py --quick
	$(PY) benchmarks/bench_startup.py

# The CUDA path in one table (< 5 min on one GPU); without CUDA every row says "no CUDA device: skipped", exit 0.
.PHONY: gpu-check
gpu-check: $(STAMP) ## GPU check table (ARGS=--no-compile skips torch.compile)
	$(PY) benchmarks/gpu_check.py $(ARGS)

lint: $(STAMP) ## ruff check
	$(PY) -m ruff check ddtas_lightning tests benchmarks

format: $(STAMP) ## ruff format
	$(PY) -m ruff format ddtas_lightning tests benchmarks

clean: ## remove .venv, outputs/ and the pytest cache
	rm -rf $(VENV) outputs .pytest_cache

# NSPA study (issue 6): 4 negative-selection strategies x 5 seeds on gaussian_clusters, then mean +- std,
# in two settings: unit-norm embeddings with a plain-L2 triplet loss (experiment=nspa_gaussian_clusters) and
# the paper's own, un-normalised ReLU embeddings with a squared-L2 triplet loss (nspa_gaussian_clusters_raw).
NSPA_DIR ?= multirun/nspa_gaussian_clusters/study
NSPA_RAW_DIR ?= multirun/nspa_gaussian_clusters_raw/study
NSPA_MINERS := miner=nspa_hardest,nspa_random_hard,nspa_semi_hard,nspa seed=0,1,2,3,4
.PHONY: nspa
nspa: $(STAMP) ## NSPA study: 4 strategies x 5 seeds, then mean +- std tables
	OMP_NUM_THREADS=1 $(PY) -m ddtas_lightning.train -m experiment=nspa_gaussian_clusters $(NSPA_MINERS) \
		hydra.sweep.dir=$(NSPA_DIR) $(ARGS)
	OMP_NUM_THREADS=1 $(PY) -m ddtas_lightning.train -m experiment=nspa_gaussian_clusters_raw $(NSPA_MINERS) \
		hydra.sweep.dir=$(NSPA_RAW_DIR) $(ARGS)
	@for d in $(NSPA_DIR) $(NSPA_RAW_DIR); do \
		$(PY) -m ddtas_lightning.nspa_report $$d && \
		$(PY) -m ddtas_lightning.nspa_report $$d --split untrained && \
		$(PY) -m ddtas_lightning.nspa_report $$d --split heldout || exit 1; done

# Static grid vs learned thresholds vs Optuna TPE: `make sweep && make compare`. The sweep runs every arm of
# conf/experiment/threshold_grid.yaml x 3 seeds into multirun/threshold_grid/<date>_<time>/, then a TPE study
# (conf/hparams_search/threshold_tpe.yaml, seed 0) into multirun/threshold_tpe/<date>_<time>/; model selection
# on held-out train classes throughout. compare reads the latest of each (or SWEEP_DIR=..., TPE_DIR=...) and
# writes its tables, plots and report.md to <grid sweep dir>/report/ (COMPARE_ARGS=--wandb: also to W&B).
SWEEP_DIR ?= multirun/threshold_grid
TPE_DIR ?= multirun/threshold_tpe
.PHONY: sweep compare
sweep: $(STAMP) ## grid vs learned thresholds (experiment=threshold_grid), then a TPE study (hparams_search=threshold_tpe)
	$(PY) -m ddtas_lightning.train -m experiment=threshold_grid $(ARGS)
	$(PY) -m ddtas_lightning.train -m hparams_search=threshold_tpe $(ARGS)

compare: $(STAMP) ## tables, plots and report.md of the latest sweep and TPE study (SWEEP_DIR=, TPE_DIR=, COMPARE_ARGS=)
	$(PY) -m ddtas_lightning.compare $(SWEEP_DIR) $(wildcard $(TPE_DIR)) $(COMPARE_ARGS)

# Learned thresholds vs the grid (issue 13): `make study` runs experiment=threshold_study (cached-feature
# mode: a frozen random-init resnet18's features of each embedded image set, cached once; MLP heads train on
# them) for every image set x run length: the lambda grid, the learned arms from both ends of the grid and
# the arms without a start (STUDY_HEADS_ARMS: the grid's heads in one run, into learned_heads/), then the pruned
# searches (STUDY_SEARCHES: conf/hparams_search/<name>.yaml, an Optuna study per seed, into search_<name>/seed<k>/;
# the report reads each as one family, its pruned trials' CPU seconds included), STUDY_SEEDS seeds each
# (STUDY_LONG_* for the 1,000-step settings: fewer arms), STUDY_JOBS settings at a time, into
# STUDY_DIR/<images>_<steps>/{grid,learned,...}; then the report (tables, lambda plots) in STUDY_DIR/report.
# Each sweep's checkpoints are deleted when it ends (metrics, logs and per-query results stay): ~30 MB a run,
# 22 GB for the 660 runs of the full study (before the searches: up to 432 trials more).
STUDY_NEW_DIR := multirun/threshold_study/$(shell date +%Y-%m-%d_%H-%M-%S)
STUDY_DIR ?= $(STUDY_NEW_DIR)
STUDY_LAST_DIR = $(lastword $(sort $(wildcard multirun/threshold_study/[0-9]*_*)))
STUDY_IMAGES ?= synthetic_200 glyphs_plain
STUDY_STEPS ?= 100 1000
STUDY_GRID ?= -0.2,0.0,0.2,0.4,0.6,0.8
STUDY_STARTS ?= -0.2,0.8
STUDY_SEEDS ?= 0,1,2,3,4,5,6,7,8,9,10,11
STUDY_ARMS ?= study/meta_faithful,study/meta_heldout,study/meta_nca,study/hg_loss,study/hg_nca,study/hg_nca_heldout,study/hg_nca_heldout_mb64,study/hg_nca_heldout_head,study/stats_rate,study/stats_rate_balanced
STUDY_LONG_SEEDS ?= 0,1,2,3,4,5
STUDY_LONG_ARMS ?= study/meta_faithful,study/hg_nca_heldout,study/hg_nca_heldout_mb64,study/stats_rate,study/stats_rate_balanced
# Arms without a start (issue 23: the whole grid in one run, one head per STUDY_GRID lambda): once per seed,
# into learned_heads/ (empty: none)
STUDY_HEADS_ARMS ?= study/many_heads,study/many_heads_shared,study/many_heads_sha
# Pruned searches over the grid's lambdas (issue 23; hparams_search=<name>, the grid's 6 runs at most): once per
# seed, into search_<name>/seed<k>/ (empty: none)
STUDY_SEARCHES ?= study_grid_sha study_tpe_median
STUDY_JOBS ?= 2
# STUDY_EXPERIMENT=threshold_study_pretrained: the realistic regime (ImageNet EfficientNet-Lite0 features of the
# sets `prepare` builds; `make study-pretrained`)
STUDY_EXPERIMENT ?= threshold_study
STUDY_TRAIN = OMP_NUM_THREADS=1 $(PY) -m ddtas_lightning.train -m experiment=$(STUDY_EXPERIMENT)
.PHONY: study study-report
study: $(STAMP) ## learned-threshold study: grid vs learned arms, 2 image sets x 100 / 1,000 steps (STUDY_*=)
	@for images in $(STUDY_IMAGES); do OMP_NUM_THREADS=1 $(PY) -m ddtas_lightning.data.cached_features \
		experiment=$(STUDY_EXPERIMENT) dataset@dataset.source.images=$$images || exit 1; done
	@for images in $(STUDY_IMAGES); do for steps in $(STUDY_STEPS); do echo "$$images $$steps"; done; done | \
	xargs -P $(STUDY_JOBS) -L 1 sh -c 'images=$$0 steps=$$1 out=$(STUDY_DIR)/$${0}_$${1}; mkdir -p $$out; \
		if [ $$steps -ge 1000 ]; then seeds=$(STUDY_LONG_SEEDS) arms=$(STUDY_LONG_ARMS); \
		else seeds=$(STUDY_SEEDS) arms=$(STUDY_ARMS); fi; \
		common="dataset@dataset.source.images=$$images data.batches_per_epoch=$$((steps / 10)) $(ARGS)"; \
		$(STUDY_TRAIN) arm=study/static loss.threshold=$(STUDY_GRID) seed=$$seeds $$common \
			hydra.sweep.dir=$$out/grid > $$out.grid.log 2>&1 && find $$out/grid -name "*.ckpt" -delete && \
		$(STUDY_TRAIN) arm=$$arms loss.threshold=$(STUDY_STARTS) seed=$$seeds $$common \
			hydra.sweep.dir=$$out/learned > $$out.learned.log 2>&1 && find $$out/learned -name "*.ckpt" -delete && \
		{ [ -z "$(STUDY_HEADS_ARMS)" ] || { $(STUDY_TRAIN) arm=$(STUDY_HEADS_ARMS) "++threshold_policy.thresholds=[$(STUDY_GRID)]" \
			seed=$$seeds $$common hydra.sweep.dir=$$out/learned_heads > $$out.heads.log 2>&1 && \
			find $$out/learned_heads -name "*.ckpt" -delete; }; } && \
		( for search in $(STUDY_SEARCHES); do for k in $$(echo $$seeds | tr , " "); do \
			$(STUDY_TRAIN) hparams_search=$$search seed=$$k $$common hydra.sweep.dir=$$out/search_$$search/seed$$k \
				>> $$out.search.log 2>&1 || exit 1; done; \
			find $$out/search_$$search -name "*.ckpt" -delete; done ) \
		|| { echo "failed: $$out (log: $$out.*.log)"; exit 255; }'
	$(PY) -m ddtas_lightning.study $(STUDY_DIR)

PRETRAINED_SEEDS ?= 0,1,2,3
PRETRAINED_ARMS ?= study/meta_faithful,study/hg_nca_heldout_head,study/stats_rate,study/stats_rate_balanced,study/stats_rate_q25
PRETRAINED_DIR ?= multirun/threshold_study_pretrained/$(shell date +%Y-%m-%d_%H-%M-%S)
# The realistic regime (issue 20): the two real sets (build them first: python -m ddtas_lightning.data.prepare
# emoji --size 96; ... cjk_fonts --classes 600 --size 64), pretrained features, 1,000 steps, 4 seeds, the main arms.
.PHONY: study-pretrained
study-pretrained: $(STAMP) ## the study in the realistic regime: emoji + cjk_fonts, EfficientNet-Lite0 features (STUDY_*=)
	$(MAKE) study STUDY_EXPERIMENT=threshold_study_pretrained STUDY_IMAGES="emoji cjk_fonts" STUDY_STEPS=1000 \
		STUDY_LONG_SEEDS=$(PRETRAINED_SEEDS) STUDY_HEADS_ARMS=study/many_heads,study/many_heads_sha STUDY_LONG_ARMS=$(PRETRAINED_ARMS) \
		STUDY_DIR=$(PRETRAINED_DIR)

# Many heads in partial fine-tuning (issue 23): EfficientNet-Lite0's last two stages + head conv train on cached
# stage-5 activations of emoji at 128 px (experiment=stage_tail_lite0, identity-initialised 1,280-d head,
# 1,000 steps): the lambda grid (PARTIAL_SEEDS seeds), the grid's heads on one shared trunk
# (arm=study/many_heads_shared: split=head, the trunk gets the heads' mean gradient) and the balanced
# statistics rule from both ends of the grid (arm=study/stats_rate_balanced), then the study report.
PARTIAL_SEEDS ?= 0,1,2
PARTIAL_DIR ?= multirun/threshold_study_partial/$(shell date +%Y-%m-%d_%H-%M-%S)
PARTIAL_TRAIN = OMP_NUM_THREADS=1 $(PY) -m ddtas_lightning.train -m experiment=stage_tail_lite0 \
	dataset@dataset.source.images=emoji dataset.source.transform.image_size=128 backbone.dim=1280 \
	backbone.head_init=identity loss=soft_contrastive evaluate_before_training=true callbacks.keep_last=false \
	data.batches_per_epoch=100 trainer.max_epochs=10 seed=$(PARTIAL_SEEDS) $(ARGS)
.PHONY: study-partial
study-partial: $(STAMP) ## many heads and the statistics rule vs the grid in partial fine-tuning (emoji, Lite0 stages 6-7)
	$(PARTIAL_TRAIN) trainer.check_val_every_n_epoch=10 +arm=study/static loss.threshold=$(STUDY_GRID) \
		hydra.sweep.dir=$(PARTIAL_DIR)/emoji_1000/grid
	$(PARTIAL_TRAIN) trainer.check_val_every_n_epoch=10 +arm=study/many_heads_shared \
		"++threshold_policy.thresholds=[$(STUDY_GRID)]" hydra.sweep.dir=$(PARTIAL_DIR)/emoji_1000/learned_heads
	$(PARTIAL_TRAIN) trainer.check_val_every_n_epoch=10 +arm=study/stats_rate_balanced +study.grid_min=-0.2 \
		+study.grid_max=0.8 loss.threshold=$(STUDY_STARTS) hydra.sweep.dir=$(PARTIAL_DIR)/emoji_1000/learned_stats
	find $(PARTIAL_DIR) -name "*.ckpt" -delete
	$(PY) -m ddtas_lightning.study $(PARTIAL_DIR)

study-report: $(STAMP) ## the latest study's report again (or STUDY_DIR=multirun/threshold_study/<date>_<time>)
	$(PY) -m ddtas_lightning.study $(if $(filter command line environment,$(origin STUDY_DIR)),$(STUDY_DIR),$(STUDY_LAST_DIR))

# `make help`: every target with its `##` description.
.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
