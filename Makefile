# Set-up and everyday commands. Each target creates .venv/ on first use.
#
#   make demo   # install, then run the whole BitDistill pipeline on the tiny recipe
#   make test   # install, then run the test suite
#
# CPU machines install the CPU build of torch through constraints/cpu.txt. On a GPU machine
# run `make test CONSTRAINTS=` (or plain `pip install -e .`) to get PyPI's CUDA build.

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
EXTRAS ?= dev,serve,llamacpp,eval
BIN := $(VENV)/bin
STAMP := $(VENV)/.wft-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[$(EXTRAS)]"
	touch $@

demo: $(STAMP)
	$(BIN)/wft pipeline tiny

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bitlinear.py

clean:
	rm -rf $(VENV) runs .pytest_cache
