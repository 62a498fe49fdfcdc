# The two commands of README.md. Each creates .venv and installs tgdp_core (with the dev
# tools) on first use, and again whenever pyproject.toml changes.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: quickstart step test
quickstart: $(VENV)/.installed
	$(PY) -m tgdp_core quickstart

step: $(VENV)/.installed
	$(PY) -m tgdp_core step --preset tiny --steps 5

test: $(VENV)/.installed
	$(PY) -m pytest

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@
