# The two commands of the README: `make run` and `make test`. Both install what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test install system-packages kafka-jars lint bench-freshness bench-pixel bench-worker \
	bench-warehouse bench-replay bench-analytics

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

kafka-jars: $(STAMP)
	$(PY) -c "from opentrack.kafka_local import ensure_jars; print('Kafka jars in', ensure_jars())"

# What the tests need from Debian: the ClickHouse server the clickhouse-driver path is tested
# against, Chromium for the dashboards' browser tests, Java and Maven for the Kafka broker.
system-packages:
	bash scripts/debian-packages.sh clickhouse-server:clickhouse-server chromium:chromium \
		java:openjdk-17-jre-headless mvn:maven

run: install kafka-jars
	$(VENV)/bin/opentrack run

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: install kafka-jars system-packages lint
	$(PY) -m pytest -p no:cacheprovider -q -ra --durations=15

bench-freshness: install kafka-jars
	$(PY) bench/freshness.py

bench-pixel: install kafka-jars
	bash scripts/debian-packages.sh wrk:wrk nginx:nginx-light
	$(PY) bench/pixel/run.py --runs 3

bench-worker: install kafka-jars
	$(PY) bench/worker/run.py --runs 3

bench-warehouse: install
	$(PY) bench/warehouse/run.py

bench-replay: install kafka-jars
	$(PY) bench/replay/run.py --runs 3

bench-analytics: install
	$(PY) bench/analytics/run.py
