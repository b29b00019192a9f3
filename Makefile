# brain-ddpm: two commands on a fresh machine.
#   make demo   set up .venv and run the whole pipeline on the embedded synthetic demo cohort
#   make test   set up .venv and run the test suite
#   make demo-conditional   the demo with a model conditioned on age and sex (classifier-free guidance)
#   make demo-latent        latent diffusion at twice the demo's resolution (autoencoder + latent DDPM)
#   make demo-utility   a rare patient group: does adding synthetic patients help a patient-vs-control classifier?
# GPU cluster: make install TORCH_INDEX=https://download.pytorch.org/whl/cu126  (see README; LEONARDO: envs/leonardo.sh)

PYTHON       ?= python3
VENV         ?= .venv
BIN          := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_INDEX  ?=
PROFILE      ?= profiles/local
SNAKE_ARGS   ?=
PYTEST_ARGS  ?=
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo demo-conditional demo-latent demo-utility test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip setuptools wheel
	# torch first and pinned, so nothing else pulls a different (CUDA) build.  TORCH_INDEX is an EXTRA
	# index: the CUDA wheel (2.13.0+cu126) outranks PyPI's 2.13.0, and torch's own dependencies stay on PyPI
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	# DeepSpeed's ops are JIT-compiled when needed; building in isolation would fetch another torch
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation deepspeed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: install
	snakemake --profile $(PROFILE) --configfile config/config.yaml config/demo.yaml $(SNAKE_ARGS)
	@echo "Report: results/demo/report/report.md  (HTML: make demo SNAKE_ARGS='--report results/demo/report.html')"

demo-latent: install
	snakemake --profile $(PROFILE) --configfile config/config.yaml config/demo.yaml config/demo-latent.yaml $(SNAKE_ARGS)
	@echo "Report: results/demo-latent/report/report.md (sections 'Reconstruction' and 'Compared with another run')"

demo-conditional: install
	snakemake --profile $(PROFILE) --configfile config/config.yaml config/demo.yaml config/demo-conditional.yaml $(SNAKE_ARGS)
	@echo "Report: results/demo-conditional/report/report.md (section 'Conditioning')"

demo-utility: install
	snakemake --profile $(PROFILE) --configfile config/config.yaml config/demo.yaml config/demo-utility.yaml $(SNAKE_ARGS)
	@echo "Report: results/demo-utility/report/report.md (section 'Utility'); figures: results/demo-utility/utility/demo-utility/utility.json"

test: install
	pytest $(PYTEST_ARGS)

lint: install
	snakemake --lint --configfile config/config.yaml config/demo.yaml

clean:
	rm -rf results/demo resources/demo results/demo-conditional resources/demo-conditional results/demo-utility resources/demo-utility results/demo-latent .snakemake
