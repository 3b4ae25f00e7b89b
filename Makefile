# pcn: two commands do everything on a fresh Debian 12 machine (as root):
#   make test    set up, then run every test
#   make demo    set up, then build a two-node lab, check connectivity, tear down
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo bench lint crds clean

setup:
	@scripts/setup.sh

test: setup
	$(VENV)/bin/ruff check operator bpf crds kubectl_pcn tests bench
	$(PY) -m pytest -ra $(PYTEST_ARGS)

demo: setup
	$(PY) -m pcn_agent.demo

bench: setup
	$(PY) -m bench.run

crds: setup
	$(PY) -m pcn_crds.generate

lint: setup
	$(VENV)/bin/ruff check operator bpf crds kubectl_pcn tests bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
