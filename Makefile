# The two commands a newcomer needs: `make up ENV=dev` and `make test`.
ENV ?= dev
VENV := .venv
PY := $(VENV)/bin/python
LOCKED_IMAGES := $(patsubst %/requirements.lock,%,$(wildcard images/*/requirements.lock))
PACKAGED_IMAGES := $(patsubst %/packages.lock,%,$(wildcard images/*/packages.lock))
export PULUMI_BACKEND_URL ?= file://$(CURDIR)/.pulumi-state

.PHONY: venv wheels base-image pulumi-cli up test test-unit lint bench validate

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
	@command -v pulumi >/dev/null || { echo "The Pulumi CLI is missing: install it with 'curl -fsSL https://get.pulumi.com | sh' (https://www.pulumi.com/docs/install/), then rerun 'make up ENV=$(ENV)'."; exit 1; }

up: pulumi-cli venv
	$(VENV)/bin/mlops validate $(ENV)
	$(MAKE) base-image wheels
	mkdir -p .pulumi-state
	pulumi stack select --create $(ENV)
	for key in registryPassword mlflowPassword; do \
	  pulumi config get mlops:$$key >/dev/null 2>&1 || pulumi config set --secret mlops:$$key "$$(openssl rand -hex 24)"; \
	done
	pulumi up --stack $(ENV)

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

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
