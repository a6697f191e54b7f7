# smear-sweep: `make run` runs the default sweep, `make test` the whole suite. Both install on their own.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install run smoke test test-fast fuzz bench browser clean submit

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: install          ## the default sweep (local Ray, MLflow in ./mlflow.db, results in ./results)
	$(PY) service/launch.py $(ARGS)

smoke: install        ## the default sweep with a tiny budget
	$(PY) service/launch.py --smoke $(ARGS)

test: install browser ## the whole suite: unit tests, then real Ray / MLflow sweeps and a browser (marked slow)
	$(PY) -m pytest $(ARGS)

browser:              ## Debian's Chromium for the MLflow UI test (Playwright drives it; it cannot download one)
	@command -v chromium >/dev/null 2>&1 || { [ -n "$${SMEAR_CHROMIUM:-}" ] && [ -f "$$SMEAR_CHROMIUM" ] && [ -x "$$SMEAR_CHROMIUM" ]; } || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "make: could not install chromium (not root?): apt-get install chromium, or set SMEAR_CHROMIUM"

test-fast: install    ## unit tests only
	$(PY) -m pytest -m "not slow" $(ARGS)

submit: install       ## ray job submit of launch.py $(ARGS), recording the git commit first (service/provenance.py)
	$(PY) -m service.provenance
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(VENV)/bin/ray job submit --address $${RAY_DASHBOARD:-http://127.0.0.1:8265} \
	  --working-dir . -- python service/launch.py $(ARGS)

fuzz: install         ## the input boundary's fuzz test, long profile (5,000 examples per test; CI runs 300)
	SMEAR_FUZZ_PROFILE=long $(PY) -m pytest tests/test_fuzz_inputs.py $(ARGS)

bench: install        ## routing block cost per method (see BENCHMARKS.md)
	$(PY) -m benchmarks.routing_cost --quick

clean:
	rm -rf results mlflow.db mlartifacts .pytest_cache
