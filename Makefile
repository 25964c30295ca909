# The two commands a newcomer needs: `make up ENV=dev` and `make test`.
ENV ?= dev
VENV := .venv
PY := $(VENV)/bin/python
# The platform images' locks, and each model project's (installed on top of them: images/model/Dockerfile).
LOCKED_IMAGES := $(patsubst %/requirements.lock,%,$(wildcard images/*/requirements.lock models/*/requirements.lock))
PACKAGED_IMAGES := $(patsubst %/packages.lock,%,$(wildcard images/*/packages.lock))
export PULUMI_BACKEND_URL ?= file://$(CURDIR)/.pulumi-state

.PHONY: venv wheels base-image pulumi-cli announce-up stack-secrets docker-tls-secrets up test test-unit lint bench validate

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

wheels:
	for image in $(LOCKED_IMAGES); do scripts/fetch-wheels.sh $$image; done
	for image in $(PACKAGED_IMAGES); do scripts/fetch-debs.sh $$image; done

base-image:
	scripts/build-base-image.sh

pulumi-cli:
	@command -v pulumi >/dev/null || { echo "The Pulumi CLI is missing (no 'pulumi' on PATH). Install it with: curl -fsSL https://get.pulumi.com | sh -s -- --version 3.272.0 (it goes to ~/.pulumi/bin; add that to PATH, or see https://www.pulumi.com/docs/install/), then rerun 'make up ENV=$(ENV)'."; exit 1; }

announce-up:
	@echo "make up ENV=$(ENV) installs and runs, in this order: a Python venv in $(VENV) (this project and its test"
	@echo "tools, from PyPI); the base image mlops-base:bookworm (docker build, Debian packages); the locked wheels"
	@echo "and .debs of images/* (scripts/fetch-wheels.sh, fetch-debs.sh); then the Pulumi stack $(ENV), with random"
	@echo "secrets for it if it has none, and its containers (pulumi up). The Pulumi CLI itself it does not install."

# A secret goes to `pulumi config set` on stdin, never as an argument: every local user reads arguments in `ps`.
# Models are signed with the key of the stage at the start of ENV's promotion chain (the one that trains them),
# and ENV's replicas trust its public key (docs/security.md, "Signed models").
stack-secrets:
	for key in registryPassword mlflowPassword; do \
	  pulumi config get --stack $(ENV) mlops:$$key >/dev/null 2>&1 || \
	    openssl rand -hex 24 | pulumi config set --stack $(ENV) --secret mlops:$$key; \
	done
	set -e; chain=$$($(VENV)/bin/mlops stages --chain $(ENV)); signer=$${chain%% *}; \
	if [ "$$signer" = "$(ENV)" ]; then \
	  pulumi config get --stack $(ENV) mlops:modelSigningKey >/dev/null 2>&1 || \
	    openssl genpkey -algorithm ed25519 | pulumi config set --stack $(ENV) --secret mlops:modelSigningKey; \
	fi; \
	pulumi config get --stack $(ENV) mlops:trustedModelKeys >/dev/null 2>&1 || \
	  pulumi config get --stack $$signer mlops:modelSigningKey | openssl pkey -pubout | \
	    pulumi config set --stack $(ENV) mlops:trustedModelKeys

# A stage on a TLS Docker host reaches its engine with a client certificate that engine's CA signed: CERTS names the
# folder that holds it as DOCKER_CERT_PATH does, stored as the stack's secrets on stdin, each config key from its file
# (components/docker_tls.py's CERT_FILES). Every file is checked before any is stored.
DOCKER_TLS_FILES := dockerCaCert:ca.pem dockerClientCert:cert.pem dockerClientKey:key.pem
docker-tls-secrets:
	@test -n "$(CERTS)" || { echo "make docker-tls-secrets ENV=$(ENV) CERTS=FOLDER: FOLDER holds the client certificate (ca.pem, cert.pem, key.pem)"; exit 2; }
	@for pair in $(DOCKER_TLS_FILES); do file="$(CERTS)/$${pair#*:}"; test -r "$$file" || { echo "$$file: missing or unreadable; CERTS holds ca.pem, cert.pem and key.pem"; exit 2; }; done
	for pair in $(DOCKER_TLS_FILES); do \
	  pulumi config set --stack $(ENV) --secret "mlops:$${pair%%:*}" < "$(CERTS)/$${pair#*:}" || exit 1; \
	done

up: announce-up pulumi-cli venv
	$(VENV)/bin/mlops validate $(ENV)
	$(MAKE) base-image wheels
	mkdir -p .pulumi-state
	pulumi stack select --create $(ENV)
	$(MAKE) stack-secrets ENV=$(ENV)
	pulumi up --stack $(ENV)

test: venv
	$(PY) -m pytest -q

# Each image's python, and each model project's, is a program of its own (two images have a start.py): one mypy
# run each, with a cache of its own.
TYPED_PROGRAMS := images/gateway images/mlflow images/prometheus images/serving images/training $(wildcard models/*)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	for program in $(TYPED_PROGRAMS); do $(VENV)/bin/mypy --cache-dir .mypy_cache/$$(basename $$program) $$program || exit 1; done

test-unit: venv
	$(PY) -m pytest -q -m "not docker"

validate: venv
	$(VENV)/bin/mlops validate

# Writes BENCHMARKS.md (see benchmarks/run.py). The serving figure needs wrk, Debian's HTTP load generator,
# and the wheels of its `mlflow models serve` image.
bench: venv base-image wheels
	command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
	scripts/fetch-wheels.sh benchmarks/mlflow_serve
	$(PY) -m benchmarks.run --output BENCHMARKS.md
