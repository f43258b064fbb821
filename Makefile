# make run: install, create the database and a first key (printed once), serve on 127.0.0.1:8000, with as many
#   server processes as serve most on the cores and memory it may use (python main.py: docs/production.md).
#   make run WORKERS=2: two server processes, each with its share of the cores.
# make test: install, then the whole test suite.
# make screenshot: docs/screenshot.png, taken by the web page's browser test (needs chromium).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?=

.PHONY: run test install bench clean screenshot

# python main.py is `uvicorn main:app` with WEB_CONCURRENCY set to the fast layout's workers unless given: uvicorn
# starts that many, and each reads it to take its share of the cores. The app's start-up gives uvicorn its
# connection limits (edge/serving.py) and bounds its wait at exit (SHUTDOWN_TIMEOUT_S and 5 s).
run: $(VENV)/.installed
	$(BIN)/python cli.py init
	$(if $(WORKERS),WEB_CONCURRENCY=$(WORKERS) )$(BIN)/python main.py --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -r requirements-dev.txt
	touch $(VENV)/.installed $@

clean:
	rm -rf $(VENV) .pytest_cache $$(find . -name __pycache__ -not -path "./.venv/*")

bench: $(VENV)/.installed-dev bench/peers/.venv/.installed
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/usage_history.py
	$(BIN)/python bench/serving_frameworks.py

# The peer servers of bench/serving_frameworks.py, in a virtualenv of their own: the server's gains nothing.
bench/peers/.venv/.installed: bench/peers/requirements.txt
	test -x bench/peers/.venv/bin/python || $(PYTHON) -m venv bench/peers/.venv
	bench/peers/.venv/bin/pip install --disable-pip-version-check -r bench/peers/requirements.txt
	touch $@

screenshot: $(VENV)/.installed-dev
	SCREENSHOT_TO=docs/screenshot.png $(BIN)/python -m pytest -q tests/edge/test_web_page.py -k cat_photo
