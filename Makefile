# Two commands for a newcomer (see README): `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_TEST := etcd-server bind9-dnsutils iputils-ping iproute2
APT_BENCH := dnsperf dnsmasq-base etcd-server

.PHONY: run test test-deps bench bench-deps lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/discovery serve

test-deps:
	@command -v etcd >/dev/null && command -v dig >/dev/null && command -v ping >/dev/null \
	  && command -v ip >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_TEST); }

test: test-deps $(VENV)/.installed
	$(PY) -m pytest

bench-deps: $(VENV)/.installed
	@command -v dnsperf >/dev/null && command -v etcd >/dev/null && { command -v dnsmasq || test -x /usr/sbin/dnsmasq; } >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_BENCH); }
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[test,bench]'

bench: bench-deps
	$(PY) bench/dnsperf_compare.py

lint: $(VENV)/.installed
	$(PY) -m ruff check discovery tests bench
	$(PY) -m mypy discovery
