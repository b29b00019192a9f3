# brain-ddpm: two commands on a fresh machine.
#   make demo   set up .venv and run the whole pipeline on the embedded synthetic demo cohort
#   make test   set up .venv and run the test suite
#   make demo-conditional   the demo with a model conditioned on age and sex (classifier-free guidance)
#   make demo-latent        latent diffusion at twice the demo's resolution (autoencoder + latent rectified flow)
#   make demo-utility   a rare patient group: does adding synthetic patients help a patient-vs-control classifier?
#   make demo-raw       raw native-space heads in: preprocessing (N4, deepbet, ANTs registration), input QC, the demo
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

.PHONY: install demo demo-conditional demo-latent demo-utility demo-raw test lint clean

# torch as asked for: an installed torch of another version or build than TORCH_VERSION and TORCH_INDEX name (a CPU
# build left by an earlier install, when TORCH_INDEX names a CUDA index) is replaced, where the stamp file alone
# would say "Nothing to be done". envs/torch_build.py compares them without importing torch, and prints only a
# mismatch; read-only, so `make -n install` runs nothing.
TORCH_MISMATCH := $(shell test -f $(VENV)/.installed && test -x $(BIN)/python && \
                    $(BIN)/python envs/torch_build.py $(TORCH_VERSION) $(TORCH_INDEX) 2>&1)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(if $(TORCH_MISMATCH),FORCE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_MISMATCH),@echo "$(TORCH_MISMATCH); reinstalling it")
	$(if $(TORCH_MISMATCH),$(BIN)/python -m pip uninstall -q -y torch)
	$(BIN)/python -m pip install -q -U pip setuptools wheel
	# torch first and pinned, so nothing else pulls a different (CUDA) build.  TORCH_INDEX is an EXTRA
	# index: the CUDA wheel (2.13.0+cu126) outranks PyPI's 2.13.0, and torch's own dependencies stay on PyPI
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	# DeepSpeed's ops are JIT-compiled when needed; building in isolation would fetch another torch
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation deepspeed
	$(BIN)/python -m pip install -q -e '.[test]'
	# ANTsPy without its numpy<2.4 pin (it conflicts with the SLURM plugin's numpy>=2.4.5; pyproject.toml says why)
	$(BIN)/python -m pip install -q --no-deps antspyx==0.6.3
	$(BIN)/python envs/torch_build.py $(TORCH_VERSION) $(TORCH_INDEX)
	touch $@

FORCE:

demo: install
	snakemake --profile $(PROFILE) --configfile config/config.yaml config/demo.yaml $(SNAKE_ARGS)
	@echo "Report: results/demo/report/report.md, and as one HTML page: results/demo/report/report.html"
	@echo "(Snakemake's report of every output, a file of its own: make demo SNAKE_ARGS='--report results/demo/snakemake-report.html')"

# four raw-like heads of synthetic subjects that are not in the demo cohort (their own seed), as a BIDS folder
DEMO_RAW := resources/demo-raw
$(DEMO_RAW)/raw/participants.tsv: | install
	brainddpm demo-cohort --n 4 --seed 7 --out $(DEMO_RAW)/mni
	brainddpm raw-heads --from $(DEMO_RAW)/mni --n 4 --seed 7 --out $(DEMO_RAW)/raw

demo-raw: install $(DEMO_RAW)/raw/participants.tsv
	snakemake --profile $(PROFILE) --configfile config/config.yaml config/demo.yaml config/demo-raw.yaml $(SNAKE_ARGS)
	@echo "Report: results/demo-raw/report/report.md (section 'Data'); preprocessing: results/demo-raw/preprocessed/"

demo-latent: install
	snakemake --profile $(PROFILE) --configfile config/config.yaml config/demo.yaml config/demo-latent.yaml $(SNAKE_ARGS)
	@echo "Report: results/demo-latent/report/report.md (sections 'Reconstruction' and 'Compared with another run')"

demo-conditional: install
	snakemake --profile $(PROFILE) --configfile config/config.yaml config/demo.yaml config/demo-conditional.yaml $(SNAKE_ARGS)
	@echo "Report: results/demo-conditional/report/report.md (section 'Conditioning')"

demo-utility: install
	snakemake --profile $(PROFILE) --configfile config/config.yaml config/demo.yaml config/demo-utility.yaml $(SNAKE_ARGS)
	@echo "Report: results/demo-utility/report/report.md (section 'Utility'); figures: results/demo-utility/utility/demo-utility/utility.json"

# Two pytest workers (pytest-xdist), every SLURM test in one of them (tests/conftest.py), where most of the time
# is the SLURM plugin's status polling, and the CPU tests in the other: the suite's 20 minutes on 2 cores
# (docs/benchmarks.md, "The test suite"). TEST_WORKERS=0: one process (about twice as long).
TEST_WORKERS ?= 2
test: install lint
	pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS)) $(PYTEST_ARGS)

# ruff: pyflakes, pycodestyle, import order, bugbear, pyupgrade (rules and why: pyproject.toml [tool.ruff]);
# snakefmt: the rules' layout; snakemake --lint: Snakemake's own advice (log, benchmark, params, ...)
lint: install
	ruff check src tests
	snakefmt --check Snakefile workflow
	snakemake --lint --configfile config/config.yaml config/demo.yaml

clean:
	rm -rf results/demo-raw resources/demo-raw results/demo resources/demo results/demo-conditional resources/demo-conditional results/demo-utility resources/demo-utility results/demo-latent .snakemake
