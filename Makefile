# Two commands do all set-up on a fresh machine:
#   make demo   - install, synthesize a small corpus, run the pipeline with DVC
#   make test   - install, run the whole test suite
# Both create/update .venv from the committed lock (requirements.lock); a second run installs nothing unless the
# lock or pyproject.toml changed. `make lock` refreshes the lock on purpose (then run `make test` before committing).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# the one package outside the lock (below); infra/Dockerfile's TORCH_VERSION names the same
TORCH_VERSION := 2.13.0
# the lock holds CPython 3.11 wheels (torch's CPU wheel here is cp311)
PYTHON ?= python3
# `make lock` moves every package to its newest allowed release; `make lock LOCK_UPGRADE=` keeps the pins
# that pyproject.toml still allows and changes only what it must
LOCK_UPGRADE ?= --upgrade
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

.PHONY: install browser lock test test-fast demo lint bench clean-data s3-up s3-down

install: $(STAMP)

# 1. torch alone, with pip: 2.13.0 is the CPU wheel on these machines (pip's own configuration finds it; uv does
#    not read it). Its dependencies are held to the lock's versions; on a machine whose pip finds PyPI's CUDA
#    build, the CUDA runtime wheels come with it, unlocked.
# 2. uv at its locked version and hashes, then everything in the lock with uv (hash-checked, no resolution: the
#    lock is the resolution; the two sdists in it, face-recognition-models and antlr4-python3-runtime, are built
#    with the locked setuptools), then the project itself, editable, built with the locked setuptools.
$(STAMP): $(LOCK) pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
		echo "error: $(LOCK) is locked for CPython 3.11; $(PYTHON) is $$($(PYTHON) -V 2>&1) (make PYTHON=python3.11 ...)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) tools/lockfile.py pins > $(VENV)/lock-pins.txt
	$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
		|| $(PY) -m pip install -q torch==$(TORCH_VERSION) -c $(VENV)/lock-pins.txt 2> >(grep -v "$(PIP_NOISE)" >&2)
	$(PY) tools/lockfile.py entry uv > $(VENV)/lock-uv.txt
	$(PY) -m pip install -q --no-deps --require-hashes -r $(VENV)/lock-uv.txt 2> >(grep -v "$(PIP_NOISE)" >&2)
	$(UV) pip install -q --python $(PY) --no-deps --require-hashes -r $(LOCK) --build-constraints $(VENV)/lock-pins.txt
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	$(UV) pip check --python $(PY)
	$(PY) -c "import torch, singer; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	@# compile librosa's numba beat tracker (BAS) into its on-disk cache now, once (~30 s), not in the first evaluation
	$(PY) -c "from singer.evaluate.metrics.bas import warm_up; warm_up()"
	@touch $(STAMP)

# Refresh the lock: resolve pyproject.toml's ranges (all extras) afresh against torch's CPU wheel, the one
# `make install` puts first (so no CUDA runtime lands in the lock), then say which versions moved. Run
# `make test` on the new versions (it reinstalls from the new lock) before committing requirements.lock.
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# uv as locked; with no lock yet (the very first one), the newest uv
	@test -x $(UV) || if $(PY) tools/lockfile.py entry uv > $(VENV)/lock-uv.txt 2>/dev/null; \
		then $(PY) -m pip install -q --no-deps --require-hashes -r $(VENV)/lock-uv.txt 2> >(grep -v "$(PIP_NOISE)" >&2); \
		else $(PY) -m pip install -q uv 2> >(grep -v "$(PIP_NOISE)" >&2); fi
	@rm -rf $(VENV)/torch-wheel && $(PY) -m pip download -q --no-deps torch==$(TORCH_VERSION) -d $(VENV)/torch-wheel \
		2> >(grep -v "$(PIP_NOISE)" >&2)
	@ls $(VENV)/torch-wheel/torch-$(TORCH_VERSION)+cpu-*.whl >/dev/null 2>&1 || { \
		echo "error: make lock resolves against torch's CPU wheel, and pip found $$(ls $(VENV)/torch-wheel): put"; \
		echo "torch-$(TORCH_VERSION)+cpu-cp311-*.whl (https://download.pytorch.org/whl/cpu) in a folder pip's find-links names"; exit 1; }
	@echo "torch==$(TORCH_VERSION)" > $(VENV)/lock-torch.txt
	@cp $(LOCK) $(VENV)/$(LOCK).before 2>/dev/null || : > $(VENV)/$(LOCK).before
	$(UV) pip compile pyproject.toml --extra dev --extra cluster $(LOCK_UPGRADE) --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--constraint $(VENV)/lock-torch.txt --find-links $(VENV)/torch-wheel --no-emit-package torch \
		--custom-compile-command "make lock" --quiet -o $(LOCK)
	@$(PY) tools/lockfile.py diff $(VENV)/$(LOCK).before $(LOCK)
	@echo "$(LOCK) written. Run make test on these versions before committing it."

# the web page's test drives Debian's headless chromium (Playwright's own browser download is not reachable)
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get install -y -q --no-install-recommends chromium >/dev/null \
		|| { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }; } \
		|| { echo "error: the browser test (tests/test_app.py) needs Debian's chromium: apt-get install chromium"; exit 1; }

test: install browser
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check singer tests benchmarks tools

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
	@echo "MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db, then"
	@echo "            http://127.0.0.1:5000/#/models/singer?workflowType=machine_learning (registry -> version -> run)"
	@echo "Prefect UI: .venv/bin/prefect server start   (http://127.0.0.1:4200; the flow run and its artifacts)"

bench: install
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/unet_step.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/evaluate.py
	$(PY) benchmarks/gpu_paper.py
	$(PY) benchmarks/paper_rehearsal.py

s3-up: install
	singer s3 up
s3-down: install
	singer s3 down

clean-data:
	rm -rf data/ingested data/clips data/crops data/split models checkpoints outputs eval ablation
