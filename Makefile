# The interface: `make demo`, `make ui`, `make test` (each sets up everything it needs first).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | sha256sum | cut -c1-12)

export DAGSTER_HOME := $(CURDIR)/dagster_home
# Nothing is ever downloaded at run time: make any accidental hub access fail fast instead of hanging.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DAGSTER_DISABLE_TELEMETRY := 1
export TRANSFORMERS_VERBOSITY := error
export PYTHONPATH := $(CURDIR)

EXTRA_STAMP := $(VENV)/.extra-$(shell cat requirements-deepdanbooru.txt | sha256sum | cut -c1-12)
SERVERS_STAMP := $(VENV)/.servers-$(shell cat requirements-servers.txt | sha256sum | cut -c1-12)
INTEGRATION_STAMP := $(VENV)/.integration-$(shell cat requirements-integration.txt | sha256sum | cut -c1-12)
SYSTEM_STAMP := $(VENV)/.system-$(shell cat .ci/install-system-packages | sha256sum | cut -c1-12)
# Steps in pool "gpu" (tagger, training, evaluation) that may run at once on this instance.
SDP_GPU_POOL_LIMIT ?= 1

.PHONY: setup models gpu-pool demo demo-tiny ui test clean-data servers

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	# CLIP's BPE file (for single-file SD 1.5 checkpoints) ships in open_clip; --no-deps keeps torchvision out.
	$(VENV)/bin/pip install --quiet --no-deps open_clip_torch==3.3.0
	$(PY) training/configs/build_clip_tokenizer.py
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

# The DeepDanbooru install extra (TensorFlow): not needed to run WD14 or ONNX taggers, installed for the tests.
$(EXTRA_STAMP): $(STAMP) requirements-deepdanbooru.txt
	$(VENV)/bin/pip install --quiet -r requirements-deepdanbooru.txt
	rm -f $(VENV)/.extra-* && touch $(EXTRA_STAMP)

# The multi-machine extras: dagster-postgres, dagster-celery, dagster-k8s and their clients.
$(SERVERS_STAMP): $(STAMP) requirements-servers.txt
	$(VENV)/bin/pip install --quiet -r requirements-servers.txt
	rm -f $(VENV)/.servers-* && touch $(SERVERS_STAMP)

servers: $(SERVERS_STAMP)

# The integration tests' extras: Playwright (Python package), and PostgreSQL, Redis and Chromium from Debian.
$(INTEGRATION_STAMP): $(STAMP) requirements-integration.txt
	$(VENV)/bin/pip install --quiet -r requirements-integration.txt
	rm -f $(VENV)/.integration-* && touch $(INTEGRATION_STAMP)

$(SYSTEM_STAMP): .ci/install-system-packages | $(STAMP)
	bash .ci/install-system-packages
	rm -f $(VENV)/.system-* && touch $(SYSTEM_STAMP)

# Tiny models and the demo dataset where missing; the demo-world tagger where missing or out of date with its code.
models: setup
	$(PY) -m embedded

# The instance's pool limit (stored in dagster_home's database, so it applies to the UI, daemon and demo).
gpu-pool: setup
	$(VENV)/bin/dagster instance concurrency set gpu $(SDP_GPU_POOL_LIMIT)

# The demo world: an embedding of its new character on its base model (models/demo-base, shipped in git).
demo: models gpu-pool
	$(PY) -m pipelines.demo

# The tiny random models' demo dataset: every stage in seconds, nothing learned.
demo-tiny: models gpu-pool
	$(PY) -m pipelines.demo demo

ui: models gpu-pool
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# models: tests/test_demo_world.py checks the tags of the demo tagger that `make models` trains.
test: setup models $(EXTRA_STAMP) servers $(INTEGRATION_STAMP) $(SYSTEM_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean-data:
	rm -rf data
