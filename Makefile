# Yilian: `make run` serves the demo alliance on http://127.0.0.1:8000/fhir, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export YILIAN_DATABASE_URL ?= sqlite:///./var/yilian.db

.PHONY: run test test-sqlite test-postgres openapi definitions bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/yilian db upgrade
	$(BIN)/yilian demo-data --if-empty
	$(BIN)/yilian serve --host 127.0.0.1 --port 8000

# Runs on SQLite unless YILIAN_TEST_DATABASE_URL names a PostgreSQL database.
test: $(STAMP)
	$(BIN)/python -m pytest

test-postgres: $(STAMP)
	YILIAN_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test $(BIN)/python -m pytest

openapi: $(STAMP)
	$(BIN)/yilian openapi openapi/openapi.json

# Re-derive the compact FHIR definitions shipped in service/fhir/definitions/ from the
# hl7.fhir.r4.examples@4.0.1 npm package (needs npm; users never need to run this).
definitions: $(STAMP)
	$(BIN)/python -m service.fhir.definitions.derive_search
	$(BIN)/python -m service.fhir.definitions.derive_validation

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) var .cache .pytest_cache
