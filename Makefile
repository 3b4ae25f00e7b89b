# pcn: two commands do everything on a fresh Debian 12 machine (as root):
#   make test    set up, then run every test
#   make demo    set up, then build a two-node lab, check connectivity, tear down
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo bench bench-policy soak lint typecheck layers crds k8s conformance netpol clean

setup:
	@scripts/setup.sh

test: setup lint layers typecheck
	$(PY) -m pytest -ra $(PYTEST_ARGS)

demo: setup
	$(PY) -m pcn_lab.demo

# BENCH_ARGS="--only SCENARIO,... --runs N ..." (python -m bench.run --help)
BENCH_ARGS ?=
bench: setup
	$(PY) -m bench.run $(BENCH_ARGS)

# Only the network policy scenarios (issue 11): reconcile per change, pod add, throughput.
bench-policy: setup
	$(PY) -m bench.run --only policy-reconcile,policy-pod-add,policy-throughput $(BENCH_ARGS)

# Agent restart soak (issue 9), not part of `make test`: RESTARTS=5 to iterate.
RESTARTS ?= 100
SOAK_ARGS ?=
soak: setup
	$(PY) -m bench.soak --restarts $(RESTARTS) $(SOAK_ARGS)

# The pinned upstream components of the real-cluster lab (issue 10), built from
# the Go module proxy into /var/cache/pcn/k8s/<key>/ once; not part of `make test`.
K8S_ARGS ?=
k8s: setup
	$(PY) -m pcn_lab.cluster.build $(K8S_ARGS)

# Upstream sig-network e2e on the real local cluster (needs `make k8s`; not
# part of `make test`). CONFORMANCE_ARGS="--focus REGEX --keep" to iterate.
CONFORMANCE_ARGS ?=
conformance: setup
	$(PY) -m pcn_lab.cluster.conformance $(CONFORMANCE_ARGS)

# Upstream's NetworkPolicy e2e and sigs.k8s.io/network-policy-api's conformance
# suite on the real local cluster (needs `make k8s`; not part of `make test`).
# NETPOL_ARGS="--suite e2e --focus REGEX --keep", "--suite api --api-run REGEX".
NETPOL_ARGS ?=
netpol: setup
	$(PY) -m pcn_lab.cluster.netpol $(NETPOL_ARGS)

crds: setup
	$(PY) -m pcn_crds.generate

lint: setup
	$(VENV)/bin/ruff check operator bpf crds kubectl_pcn tests bench manifests

# The layers of pyproject.toml's [tool.importlinter] (ARCHITECTURE.md draws them).
layers: setup
	$(VENV)/bin/lint-imports

# mypy finds packages by name: pcn_crds and pcn_bpf live in crds/ and bpf/.
typecheck: setup
	@mkdir -p build/typing
	@ln -sfn ../../crds build/typing/pcn_crds
	@ln -sfn ../../bpf build/typing/pcn_bpf
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
