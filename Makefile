# Two entry points a fresh machine needs (Python 3.11 plus make): `make demo` and `make test`.
# Each creates or reuses .venv and installs the project into it; nothing is installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xception_mx-installed
# torch + timm + keras for the weight-parity tests: they break `import gluoncv`, so they live in their own venv.
REF_VENV ?= .venv-ref

.PHONY: venv ref-venv test demo bench clean

venv: $(STAMP)

$(STAMP): setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "xception_mx needs Python 3.11 (mxnet 1.9.1 wheels): run make PYTHON=python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 'setuptools<70' wheel
	$(BIN)/python -m pip install -q -e '.[test,demo]'
	touch $@

ref-venv:
	bash scripts/setup_ref_venv.sh $(PYTHON) $(REF_VENV)

test: venv ref-venv
	bash scripts/install_horovod.sh $(BIN)/python
	XCEPTION_MX_REF_PYTHON=$(REF_VENV)/bin/python $(BIN)/python -m pytest -q tests

demo: venv
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) $(REF_VENV) *.egg-info .pytest_cache runs demo_data
