# The commands of README.md. Each creates .venv and installs tgdp_core (with the dev
# tools) on first use, and again whenever pyproject.toml changes.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: quickstart step test notebooks
quickstart: $(VENV)/.installed
	$(PY) -m tgdp_core quickstart

step: $(VENV)/.installed
	$(PY) -m tgdp_core step --preset tiny --steps 5

test: $(VENV)/.installed
	$(PY) -m pytest

# Execute every notebook in place at full scale: refreshes the committed outputs and README's
# figures (docs/figures). Widget outputs and state are dropped afterwards (they need a running
# kernel); nbclient cannot run an Output widget with store_widget_state=False.
NOTEBOOKS := $(sort $(wildcard notebooks/0*.ipynb))
notebooks: $(VENV)/.installed
	TGDP_NOTEBOOK_SCALE=full $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=1800 --ExecutePreprocessor.record_timing=False $(NOTEBOOKS)
	$(PY) -c "import sys; from tgdp_core.analysis import strip_widget_outputs; strip_widget_outputs(*sys.argv[1:])" $(NOTEBOOKS)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@
