# `make test` and `make demo` create/reuse the virtual environment themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlmoe-installed

.PHONY: test demo lint format clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	./scripts/bootstrap.sh $(VENV)
	@touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks experiments
	$(PY) -m ruff format --check src tests benchmarks experiments

test: lint
	$(PY) -m pytest -n 2 --dist loadfile -q

demo: $(STAMP)
	$(VENV)/bin/vlmoe demo

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks experiments
	$(PY) -m ruff check --fix src tests benchmarks experiments

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
