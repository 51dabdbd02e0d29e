# Two commands do all set-up on a fresh machine:
#   make demo   - install, synthesize a small corpus, run the pipeline with DVC
#   make test   - install, run the whole test suite
# Both create/update .venv; a second run installs nothing unless pyproject.toml changed.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# OpenMP threads that spin while waiting make torch 10-40x slower as soon as another process shares the
# 2 cores (pytest -n 2, Ray workers, a DVC stage beside a test): let them sleep instead
export OMP_WAIT_POLICY := PASSIVE
PYTEST_ARGS ?= -n 2
# this machine's pip config names index folders that do not exist; pip warns about each package
PIP_NOISE := ^WARNING: Location .* is ignored

.PHONY: install test test-fast demo lint bench clean-data s3-up s3-down

install: $(STAMP)

# torch first, alone: 2.13.0 is the CPU wheel on these machines; a bare `torch` requirement resolved by
# pip would pull the multi-GB CUDA build. The project's own range admits 2.13.0 so nothing more comes.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2> >(grep -v "$(PIP_NOISE)" >&2)
	$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
		|| $(PY) -m pip install -q torch==2.13.0 2> >(grep -v "$(PIP_NOISE)" >&2)
	$(PY) -m pip install -q -e '.[dev,cluster]' 2> >(grep -v "$(PIP_NOISE)" >&2)
	$(PY) -c "import torch, singer; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@# compile librosa's numba beat tracker (BAS) into its on-disk cache now, once (~30 s), not in the first evaluation
	$(PY) -c "from singer.evaluate.metrics.bas import warm_up; warm_up()"
	@touch $(STAMP)

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check singer tests benchmarks

# The demo: a synthetic corpus, the whole pipeline as a Prefect flow (every DVC stage, ingest to ablate),
# the model registered and put through the release gate, then a video of a held-out singer.
demo: install
	@test -d data/raw || singer synth --out data/raw
	python -m flows.pipeline
	singer register
	@if singer release; then echo "models:/singer@champion" > outputs.model; \
	 else echo "release gate refused (above): the video comes from models/full"; echo "models/full" > outputs.model; fi
	python -m singer.demo --out outputs
	singer generate --image outputs/portrait.png --audio outputs/song.wav --output outputs/demo.mp4 \
		--model "$$(cat outputs.model)" --steps 10 --no-progress
	@rm -f outputs.model
	@echo
	@echo "Video:      outputs/demo.mp4 (a held-out synthetic singer; tiny model trained on CPU)"
	@echo "Metrics:    dvc metrics show; reports/ablation.md (Table 3 shape); eval/plots/mouth_curves.png"
	@echo "Data:       data/split/{train,test}.txt, reports/*.validation.md"
	@echo "MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   (http://127.0.0.1:5000; model 'singer')"
	@echo "Prefect UI: .venv/bin/prefect server start   (http://127.0.0.1:4200; the flow run and its artifacts)"

bench: install
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/evaluate.py
	$(PY) benchmarks/gpu_paper.py

s3-up: install
	singer s3 up
s3-down: install
	singer s3 down

clean-data:
	rm -rf data/ingested data/clips data/crops data/split models checkpoints outputs eval ablation
