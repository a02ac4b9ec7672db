# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the package metadata changes.  torch==2.13.0 is pinned in pyproject.toml
# and installs the CPU wheel that lies on these machines' disk (no CUDA download).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --nbmake tests notebooks

# Where the larval VNC stack lies beside the repository (CC BY-NC-SA, so not bundled), the
# demo also detects synapses and builds the connectome on it.
VNC ?= $(wildcard ../shared/data/drosophila_vnc_sstem_gerhard2013/vnc_stack1_synapses_x0-640.h5)

demo: $(STAMP)
	$(BIN)/emdask demo $(if $(VNC),--vnc $(VNC))

clean:
	rm -rf $(VENV) emdask_demo_output
