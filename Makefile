# Two commands on a fresh machine with Python 3.10+: `make demo` runs the main job, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-extended lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m proco_ray demo

test: $(STAMP)
	$(PY) -m pytest -q

# the fault tests `make test` leaves out for time (tests/test_faults.py: S3 cut from one node, whole cluster lost)
test-extended: $(STAMP)
	$(PY) -m pytest -q -m extended

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .proco_ray
