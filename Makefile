# clipmill entry points. Everything runs from the venv at .venv/ (created on first use).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.clipmill-setup
DEMO_OUT ?= demo-dataset

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes; torch/torchvision are pinned to the wheels on this disk.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,torch,cloud]"
	@touch $(STAMP)

demo: setup
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/clipmill run samples -o $(DEMO_OUT) --recipe default
	$(VENV)/bin/clipmill stats $(DEMO_OUT)

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) bench/split.py
	$(PY) bench/pipeline.py
	$(PY) bench/scores.py
	$(PY) bench/dedup.py
	$(PY) bench/faults.py
	$(PY) bench/export.py
	$(PY) bench/caption.py
	$(PY) bench/watermark.py
	$(PY) bench/toy_t2v.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache bench/results/*.tmp
