# One place for every developer and CI command. `make test` and `make demo` install what they need.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
APT_PKGS := openssl curl iproute2 iptables nftables tcpdump stunnel4 haproxy prometheus sslscan procps util-linux wrk iperf3 nginx docker.io docker-compose debootstrap chromium
BENCH_APT :=

.PHONY: all venv apt test lint unit demo bench bench-audit soak image clean certs clean-certs

all: test

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev,bench,report]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests use as real peers (openssl, curl, stunnel, haproxy, prometheus...).
apt:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PKGS) $(EXTRA_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi; \
	else echo "not root or no apt-get: using the tools already installed"; fi

lint: venv
	$(VENV)/bin/ruff check proxy tests bench
	$(VENV)/bin/ruff format --check proxy tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/deptry proxy tests bench

unit: venv
	$(VENV)/bin/pytest -q -m unit tests

test: venv apt lint
	$(VENV)/bin/pytest -q tests

demo: venv
	$(VPY) -m proxy demo

bench: EXTRA_APT=$(BENCH_APT)
bench: venv apt
	$(VPY) -m bench.run

# What the wire auditor costs (root: network namespaces): README "Proof on the wire".
bench-audit: venv apt
	$(VPY) -m bench.audit_cost

soak: venv apt
	$(VPY) -m tests.soak --minutes $${SOAK_MINUTES:-10}

image:
	docker build --build-arg REVISION=$$(git rev-parse HEAD) -t mtls-sidecar:dev .

# Dev/demo material in certs/ (see certs/README.md), made with the sidecar's own CA commands.
CERTS_TD ?= demo.example
CERTS_DIR ?= certs
certs: venv
	@[ -f $(CERTS_DIR)/ca/ca.json ] || $(VPY) -m proxy ca init --dir $(CERTS_DIR)/ca --trust-domain $(CERTS_TD)
	$(VPY) -m proxy ca issue --dir $(CERTS_DIR)/ca --id spiffe://$(CERTS_TD)/ns/demo/sa/web --dns web --out $(CERTS_DIR)/web
	$(VPY) -m proxy ca issue --dir $(CERTS_DIR)/ca --id spiffe://$(CERTS_TD)/ns/demo/sa/client --out $(CERTS_DIR)/client

clean-certs:
	find $(CERTS_DIR) -mindepth 1 ! -name README.md -delete

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache demo-out bench/out
