# Quickstart: `make demo` (set up, then run the end-to-end demo) and `make test` (set up, then run the tests).
# Both create ./.venv on first use and install the package with every extra into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export YOLO_OFFLINE := 1

.PHONY: setup demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) recipes/yolov8_orepa.py --project runs/demo --epochs 20

test: setup
	$(PY) -m pytest
