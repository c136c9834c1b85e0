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
# Debian packages of the servers the integration tests start themselves (tests/integration/servers.py).
SERVER_PACKAGES := postgresql redis-server

.PHONY: setup models demo ui test clean-data servers server-packages

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

# Installed only when missing (dpkg -s), so a machine that has them is not touched; as root or with sudo.
server-packages:
	@missing=""; for pkg in $(SERVER_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		echo "installing$$missing"; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

# The multi-machine extras: dagster-postgres, dagster-celery, dagster-k8s and their clients.
$(SERVERS_STAMP): $(STAMP) requirements-servers.txt
	$(VENV)/bin/pip install --quiet -r requirements-servers.txt
	rm -f $(VENV)/.servers-* && touch $(SERVERS_STAMP)

servers: server-packages $(SERVERS_STAMP)

models: setup
	$(PY) -m embedded

demo: models
	$(PY) -m pipelines.demo

ui: models
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

test: setup $(EXTRA_STAMP) servers
	$(PY) -m pytest $(PYTEST_ARGS)

clean-data:
	rm -rf data
