# tangopipe: the two commands of the README and a few more.
#   make demo    the whole pipeline on a simulated detector (embedded Tango database)
#   make test    lint + every test (engine, devices, end to end)
#   make bench   benchmarks, each against a baseline measured in the same run
#   make soak    a pipeline for SOAK_MINUTES (default 30): memory of every process, rates, losses

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
SOAK_MINUTES ?= 30
SOAK_ARGS ?=

.PHONY: demo test test-sardana lint bench soak clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[tests,gui,io]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tangopipe demo --summary demo-summary.json

lint: $(STAMP)
	$(BIN)/ruff check devices pipelines lavue_bridge tests benchmarks

PYTEST := QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -p no:cacheprovider -p no:sardana_pool_plugins -ra

# The Sardana tests run in a pytest process of their own (Sardana and Taurus keep
# threads and proxies for the life of a process); both steps run, either failing fails.
test: lint
	./.ci/system-packages.sh
	$(PYTEST) tests/test_sardana.py $(PYTEST_ARGS); sardana=$$?; \
	$(PYTEST) --ignore=tests/test_sardana.py $(PYTEST_ARGS) && exit $$sardana

test-sardana: $(STAMP)
	$(PYTEST) tests/test_sardana.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# not part of make test: it runs for SOAK_MINUTES; SOAK_ARGS e.g. "--config config/xrd.yaml --every 30"
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak --minutes $(SOAK_MINUTES) --out data/soak-result.json $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
