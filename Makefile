# Two commands do all set-up on a fresh machine (Python >= 3.10 and make):
#   make quickstart   create .venv, install fedsec-bench, run scenarios/quickstart.yaml
#   make test         create .venv if needed, install, run the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: quickstart test install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

quickstart: install
	$(BIN)/fedsec run scenarios/quickstart.yaml

test: install
	$(BIN)/python -m pytest
