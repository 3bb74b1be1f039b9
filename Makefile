# Quickstart: `make demo` (set up, then run the end-to-end demo) and `make test` (set up, then run the tests).
# Both create ./.venv on first use and install the package with every extra into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export YOLO_OFFLINE := 1

ULTRALYTICS_OLDEST ?= 8.3.0
OLDEST_DIR := .ultralytics-$(ULTRALYTICS_OLDEST)

.PHONY: setup demo test lint test-portable test-ultralytics-oldest docs

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

# ruff (lint and format) and mypy on the package; .ci/run runs them before the tests.
lint: setup
	$(VENV)/bin/ruff check orepa_convert
	$(VENV)/bin/ruff format --check orepa_convert
	$(VENV)/bin/mypy orepa_convert

# The documentation site (docs/ + the API reference from the docstrings) into site/; the tests build it too.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The numeric tests with another CPU's kernels: torch's portable (default) and AVX2 code paths, one thread (other
# reduction orders), as a machine without AVX-512, or with other float16 kernels, would run them.
NUMERIC_TESTS ?= tests/test_kernels.py tests/test_block.py tests/test_pointwise.py tests/test_fold.py \
	tests/test_convert.py tests/test_state.py tests/test_tracing.py tests/test_ahead.py tests/test_training.py \
	tests/test_compile.py tests/test_amp.py tests/test_fx.py tests/test_export.py tests/test_registry.py \
	tests/test_restore_phase.py tests/test_pool.py
test-portable: setup
	for cap in default avx2; do \
		ATEN_CPU_CAPABILITY=$$cap OMP_NUM_THREADS=1 $(PY) -m pytest $(NUMERIC_TESTS) || exit 1; \
	done

# The YOLO workflow tests (single process and ultralytics' own DDP worker script) on the oldest ultralytics the
# package declares, installed beside the environment (not into it); see docs/yolo.md.
test-ultralytics-oldest: setup
	$(PY) -m pip install --quiet --no-deps --target $(OLDEST_DIR) ultralytics==$(ULTRALYTICS_OLDEST) pandas pytz tzdata
	PYTHONPATH=$(CURDIR)/$(OLDEST_DIR) $(PY) -m pytest tests/integrations/test_ultralytics.py tests/integrations/test_train_cli.py
