# make run: install, create the database and a first key (printed once), serve on 127.0.0.1:8000.
#   make run WORKERS=2: two server processes, each with its share of the cores (see docs/production.md).
# make test: install, then the whole test suite.
# make screenshot: docs/screenshot.png, taken by the web page's browser test (needs chromium).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 1

.PHONY: run test install bench clean screenshot

# Plain `uvicorn main:app`: the app's start-up gives uvicorn its connection limits (edge/serving.py) and bounds its
# wait at exit (SHUTDOWN_TIMEOUT_S and 5 s). WEB_CONCURRENCY: uvicorn starts that many workers, and each reads it
# to take its share of the cores.
run: $(VENV)/.installed
	$(BIN)/python cli.py init
	WEB_CONCURRENCY=$(WORKERS) $(BIN)/uvicorn main:app --host $(HOST) --port $(PORT)

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

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/usage_history.py

screenshot: $(VENV)/.installed-dev
	SCREENSHOT_TO=docs/screenshot.png $(BIN)/python -m pytest -q tests/edge/test_web_page.py -k cat_photo
