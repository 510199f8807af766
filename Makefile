# Two entry points a fresh machine needs (Python 3.11 plus make): `make demo` and `make test`.
# Each creates or reuses .venv and installs the project into it; nothing is installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xception_mx-installed
# torch + timm + keras for the weight-parity tests: they break `import gluoncv`, so they live in their own venv.
REF_VENV ?= .venv-ref

.PHONY: venv ref-venv lint test test-fast demo docs-outputs clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "xception_mx needs Python 3.11 (mxnet 1.9.1 wheels): run make PYTHON=python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 'setuptools<70' wheel
	@# a venv made before OpenCV became one build holds two sharing cv2/: remove both, the next line installs one
	if $(BIN)/python -m pip show -q opencv-python-headless 2>/dev/null; then \
	    $(BIN)/python -m pip uninstall -q -y opencv-python-headless opencv-python; fi
	$(BIN)/python -m pip install -q -e '.[cpu,test,demo,onnx,tensorboard]'
	touch $@

ref-venv:
	bash scripts/setup_ref_venv.sh $(PYTHON) $(REF_VENV)

lint: venv
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy

# The whole suite, lint first: a lint failure stops it before the Horovod build and the parity venv.
test: venv
	@echo "make test: lint, then Horovod built against MXNet (~4 min, once), the reference venv with torch, timm and"
	@echo "Keras (~2.5 min and 5.6 GB, once), then every test (~16 min on 2 cores). make test-fast: ~2 min."
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory ref-venv
	bash scripts/install_horovod.sh $(BIN)/python
	XCEPTION_MX_REF_PYTHON=$(REF_VENV)/bin/python $(BIN)/python -m pytest -q tests

# Lint and the tests that need neither Horovod nor the reference venv and take under ~20 s each (markers: pyproject.toml).
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow and not distributed and not parity and not faults" tests

demo: venv
	bash scripts/demo.sh

# The outputs quoted in docs/troubleshooting.md (and, with DEMO=1, README.md's demo output) rerun from the code.
docs-outputs: venv
	$(BIN)/python scripts/docs_outputs.py $(if $(DEMO),--demo)

# Keeps runs/ (every shipped config writes its checkpoints there) and demo_data/.
clean:
	rm -rf $(VENV) $(REF_VENV) *.egg-info .pytest_cache .ruff_cache build dist
