# make test: create .venv, install skd with its test extra, run the suite.
# make demo: the whole product on real images shipped with scikit-learn, in minutes on a CPU.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch's CUDA build alone is ~5.5 GB installed; with DALI and the test tools .venv takes ~6.8 GB.
NEED_GB := 8

.PHONY: test demo venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@free_gb=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free_gb" -lt $(NEED_GB) ] && [ ! -x $(BIN)/python ]; then \
		echo "error: .venv needs about $(NEED_GB) GB free here ($(CURDIR)) and $$free_gb GB is free: free some space and rerun make"; \
		exit 1; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PIP_NO_CACHE_DIR=1 $(BIN)/pip install -q --upgrade pip
	PIP_NO_CACHE_DIR=1 $(BIN)/pip install -q -e '.[test,plot,demo]'
	touch $(STAMP)

# the layer contract (setup.cfg [importlinter]), ruff check and ruff format --check first: a broken layer, a lint
# error or unformatted code fails at once;
# then one pytest worker per core (pytest-xdist): most tests wait on a subprocess importing torch
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check skd pipelines tests benchmarks examples
	$(BIN)/ruff format --check skd pipelines tests benchmarks examples
	$(BIN)/python -m pytest -q -n auto

demo: $(STAMP)
	$(BIN)/python -m skd.demo

clean:
	rm -rf $(VENV) demo
