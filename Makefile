# Two commands on a fresh clone (README "Quick start"); each makes or reuses .venv itself.
#   make demo   installs what the demo needs, runs the embedded offline demo into runs/demo
#   make test   installs the test extras, runs ruff and the whole test suite
# An environment is installed again only when pyproject.toml is newer than its stamp.
# PYTHON=/path/to/python3.11 picks the interpreter the environment is made from.

PYTHON ?= python3
VENV := .venv
PIP_LOG := $(VENV)/pip.log
TEST_EXTRAS := test,torch,export

.PHONY: demo test
demo: $(VENV)/.installed-demo
	$(VENV)/bin/python -m fcd_jax.main --config configs/demo.py --workdir runs/demo

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -n 2 -q tests

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null || { \
	  echo "make: no '$(PYTHON)' found: install Python 3.11 or newer (e.g. apt-get install python3.11 python3.11-venv) or run make PYTHON=/path/to/python3.11 $(MAKECMDGOALS)" >&2; \
	  exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "make: fcd-jax needs Python 3.11 or newer and '$(PYTHON)' is $$($(PYTHON) --version 2>&1): install Python 3.11+ (e.g. apt-get install python3.11 python3.11-venv) and run make PYTHON=python3.11 $(MAKECMDGOALS)" >&2; \
	  exit 1; }
	@$(PYTHON) -m venv $(VENV) >/dev/null 2>&1 || { rm -rf $(VENV); \
	  echo "make: '$(PYTHON) -m venv' failed: install Python's venv module (e.g. apt-get install python3-venv) and run make again" >&2; \
	  exit 1; }

# $(1): what to install, $(2): the stamp that records it.
define install
	@echo "make: installing $(1) into $(VENV) (once; again only when pyproject.toml changes)"
	@{ $(VENV)/bin/python -m pip install -q --upgrade pip \
	   && $(VENV)/bin/python -m pip install -q -e '$(1)'; } >$(PIP_LOG) 2>&1 || { \
	  echo "make: installing $(1) failed: $$(grep -m 1 -o 'ERROR: .*' $(PIP_LOG) || tail -n 1 $(PIP_LOG)) (pip needs the package index; full log in $(PIP_LOG))" >&2; \
	  exit 1; }
	@touch $(2)
endef

$(VENV)/.installed-demo: pyproject.toml | $(VENV)/bin/python
	$(call install,.,$@)

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(call install,.[$(TEST_EXTRAS)],$@)
