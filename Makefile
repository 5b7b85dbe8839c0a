# make demo: fresh machine -> venv, install, models, the embedded demo end to end.
# make test: fresh machine -> venv, install, the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A local model directory stands in for the downloads when there is one (CI: ../shared/models).
export BEAM_PIPELINE_MODEL_DIR ?= $(abspath $(wildcard ../shared/models))

.PHONY: venv models demo test clean chromium template-metadata

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

models: venv
	$(PY) -m model_handlers.registry

demo: models
	$(PY) -m beam_pipeline --output demo_out

# Test files spread over the cores (at most 4 workers); a file's tests stay on one worker, so its module
# fixtures (a recipe's run, a server) are made once. Much of the suite waits on servers and time limits.
test: venv chromium
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=20 tests

# tests/test_report.py renders report.html in headless Chromium; install it where it is missing (Debian/Ubuntu).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

# After changing beam_pipeline/options.py: the flex template's parameters follow the flags.
template-metadata: venv
	$(PY) -m beam_pipeline.template_metadata > templates/metadata.json

clean:
	rm -rf $(VENV) demo_out *.egg-info
