# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the package metadata changes.  torch is installed first, pinned to the CPU
# build 2.13.0 that lies on these machines' disk (no CUDA download); the package itself
# only asks for torch>=2.2, which that satisfies.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 --nbmake tests notebooks

# Where the larval VNC stack lies beside the repository (CC BY-NC-SA, so not bundled), the
# demo also detects synapses and builds the connectome on it.
VNC ?= $(wildcard ../shared/data/drosophila_vnc_sstem_gerhard2013/vnc_stack1_synapses_x0-640.h5)

demo: $(STAMP)
	$(BIN)/emdask demo $(if $(VNC),--vnc $(VNC))

clean:
	rm -rf $(VENV) emdask_demo_output
