# make demo: fresh machine -> venv, install, models, the embedded demo end to end.
# make test: fresh machine -> venv, install, the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A local model directory stands in for the downloads when there is one (CI: ../shared/models).
export BEAM_PIPELINE_MODEL_DIR ?= $(abspath $(wildcard ../shared/models))

.PHONY: venv models demo test clean

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

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) demo_out *.egg-info
