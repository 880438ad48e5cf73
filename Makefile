# The two commands: `make run` (set up + the default CPU pipeline) and `make test` (set up + the tests).
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup run test test-all flow benchmark profile

setup:
	@bash scripts/setup.sh

run: setup
	@$(if $(WAIT),,python scripts/project_lock.py)
	dvc repro $(if $(WAIT),--wait-for-lock)
	@echo; echo "Report: data/report/report.md (sample grids and plots beside it)"
	@dvc metrics show

test: setup
	python -m pytest -q -n 2 --durations=15

test-all: setup
	python -m pytest -q -n 2 -m "not gpu"

# `make flow PARALLEL=2`: independent branches two at a time, one thread each (flows/concurrent.py)
flow: setup
	python -m flows.pipeline $(if $(PARALLEL),--max-parallel $(PARALLEL))

benchmark: setup
	python benchmarks/pipeline_times.py

# `make profile P=gpu`: params_gpu.yaml applied to params.yaml (docs/profiles.md); `git checkout params.yaml` undoes it.
profile: setup
	python -m pipeline.config apply params_$(P).yaml
