#!/usr/bin/env bash
# One-time setup of brain-ddpm on CINECA LEONARDO (Booster).  Builds the one tested install: the
# repository's .venv (the Makefile's `install` target), with the CUDA build of torch, and checks it.
#
# Run it from the repository root, on a login node or in a job on lrd_all_serial (which runs on the
# login nodes and, like them, reaches PyPI; compute nodes cannot):
#
#   cd $WORK/brain-ddpm && bash envs/leonardo.sh
#   sbatch -A <account> -p lrd_all_serial -c 4 --mem=16G -t 60 -o setup-%j.log envs/leonardo.sh
#
# Clone into $WORK (project area, seen by the compute nodes, not purged): the venv, results/ and the
# SLURM logs live in the clone.  Every later shell (and `launch.setup` in the site config):
#
#   module load $BRAINDDPM_PYTHON_MODULE && source $WORK/brain-ddpm/.venv/bin/activate
#
# Overrides (environment): BRAINDDPM_PYTHON_MODULE (default python/3.11.7; `module avail python`
# lists what the site has), TORCH_INDEX (default the CUDA 12.6 wheels, for the A100s' driver),
# TORCH_VERSION (default: the Makefile's pin).
set -euo pipefail

PYTHON_MODULE=${BRAINDDPM_PYTHON_MODULE:-python/3.11.7}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu126}

if [ ! -f pyproject.toml ] || [ ! -f Snakefile ]; then
    echo "envs/leonardo.sh: run me from the brain-ddpm repository root (cd \$WORK/brain-ddpm)" >&2
    exit 2
fi

# `module` is a shell function of interactive shells; batch scripts may have to define it first.
if ! command -v module >/dev/null 2>&1; then
    for init in /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash; do
        # shellcheck disable=SC1090
        [ -f "$init" ] && source "$init" && break
    done
fi
if command -v module >/dev/null 2>&1; then
    module load "$PYTHON_MODULE" || {
        echo "envs/leonardo.sh: 'module load $PYTHON_MODULE' failed; pick one of \`module avail python\`" \
             "and rerun with BRAINDDPM_PYTHON_MODULE=<it>" >&2
        exit 2
    }
else
    echo "envs/leonardo.sh: no \`module\` command here; using $(command -v python3)" >&2
fi

python3 - <<'EOF' || { echo "envs/leonardo.sh: brain-ddpm needs Python >= 3.10" >&2; exit 2; }
import sys
sys.exit(sys.version_info < (3, 10))
EOF

make install PYTHON=python3 TORCH_INDEX="$TORCH_INDEX" ${TORCH_VERSION:+TORCH_VERSION=$TORCH_VERSION}

# What the pipeline needs from this install, checked here rather than in a 24 h job.
.venv/bin/python - <<'EOF'
import importlib.metadata as md
import sys

import torch

problems = []
if not torch.version.cuda:
    problems.append(f"torch {torch.__version__} is a CPU build: the GPU jobs need the CUDA one (TORCH_INDEX)")
plugin = md.version("snakemake-executor-plugin-slurm")
if plugin != "2.8.0":
    problems.append(f"snakemake-executor-plugin-slurm {plugin}: the profiles were checked against 2.8.0")
for name in ("snakemake", "monai", "deepspeed", "accelerate", "submitit", "h5py", "nibabel"):
    print(f"  {name:<34} {md.version(name)}")
print(f"  {'torch':<34} {torch.__version__} (CUDA {torch.version.cuda})")
print(f"  {'snakemake-executor-plugin-slurm':<34} {plugin}")
if problems:
    sys.exit("envs/leonardo.sh: " + "; ".join(problems))
EOF

cat <<EOF

brain-ddpm is installed in $PWD/.venv.  Next:
  module load $PYTHON_MODULE && source .venv/bin/activate
  export BRAINDDPM_SLURM_ACCOUNT=<your project>     # saldo -b
  snakemake -n --profile profiles/leonardo --configfile config/config.yaml <your site config>
EOF
