# tangopipe: the two commands of the README and a few more.
#   make demo    the whole pipeline on a simulated detector (embedded Tango database)
#   make test    lint + every test (engine, devices, end to end)
#   make bench   benchmarks, each against a baseline measured in the same run

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test test-sardana lint bench clean

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

test: lint
	./.ci/system-packages.sh
	$(PYTEST) --ignore=tests/test_sardana.py $(PYTEST_ARGS)

# The Sardana tests (a real Sardana driving a pipeline) pass alone, but on a fresh
# machine the Door has been seen to hang in sar_demo; until that is understood they
# are run on their own.
test-sardana: $(STAMP)
	$(PYTEST) tests/test_sardana.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
