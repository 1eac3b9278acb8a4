# Two commands for a newcomer (see README): `make run` and `make test`; `make help` lists all.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_TEST := etcd-server bind9-dnsutils iputils-ping iproute2 dnsmasq-base util-linux libc-bin chromium gcc python3-dev
APT_BENCH := dnsperf dnsmasq-base etcd-server knot nsd
APT_IMAGE := podman runc mmdebstrap podman-compose bind9-dnsutils curl docker.io docker-compose
IMAGE ?= localhost/discovery:dev

.DEFAULT_GOAL := help
.PHONY: help run test test-deps bench bench-deps lint image image-deps test-image soak

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-11s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The runtime alone for `make run`; the test tools on top for everything else.
$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.runtime

run: $(VENV)/.runtime ## start the server: DNS 127.0.0.1:8053, HTTP 127.0.0.1:8080, embedded store
	$(VENV)/bin/discovery serve

test-deps: ## install what the tests use (apt): etcd, dig, ping, ip, dnsmasq, setpriv, chromium, gcc and the Python headers
	@for tool in etcd dig ping ip bridge getent setpriv chromium gcc; do command -v $$tool >/dev/null || missing=1; done; \
	{ command -v dnsmasq || test -x /usr/sbin/dnsmasq; } >/dev/null || missing=1; \
	python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' || missing=1; \
	[ -z "$$missing" ] || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_TEST); }

test: test-deps $(VENV)/.installed ## run the whole test suite (not the image tests)
	$(PY) -m pytest

lint: $(VENV)/.installed ## ruff and mypy
	$(PY) -m ruff check discovery tests bench
	$(PY) -m mypy discovery

bench-deps: $(VENV)/.installed ## install what the benchmarks need (dnsperf, dnsmasq, NSD, Knot, matplotlib)
	@command -v dnsperf >/dev/null && command -v etcd >/dev/null && { command -v dnsmasq || test -x /usr/sbin/dnsmasq; } >/dev/null \
	  && test -x /usr/sbin/nsd && test -x /usr/sbin/knotd || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_BENCH); }
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[test,bench]'

bench: bench-deps ## queries/s against NSD, Knot DNS and dnsmasq (docs/benchmarks.md)
	$(PY) bench/dnsperf_compare.py

soak: bench-deps ## 10 minutes of churn on two replicas over etcd, etcd restarted and compacted (docs/soak.md)
	$(PY) bench/soak.py

image-deps: ## install podman, runc, mmdebstrap, podman-compose, docker.io, docker-compose (apt)
	@command -v podman >/dev/null && command -v mmdebstrap >/dev/null && command -v podman-compose >/dev/null && command -v docker-compose >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_IMAGE); }

image: image-deps ## build the container image with podman (a local Debian base when none exists)
	deploy/build-image.sh $(IMAGE)

test-image: image-deps $(VENV)/.installed ## build and run the image, bring deploy/compose.yaml up (slow)
	DISCOVERY_IMAGE_TESTS=1 $(PY) -m pytest -p no:cacheprovider -v tests/test_image.py
