#!/usr/bin/env bash
# Add snakemake and what it needs beyond the H200 image (KINDS.md's package list) and the project's wheels
# (../shared/tools/device-wheelhouse.sh) to a wheelhouse, for the one-GPU latent dry run
# (`gpu_round3_call.sh smoke:SECONDS`). Run here, from the project root, after the project's wheelhouse:
#   ../shared/tools/device-wheelhouse.sh .device-wheels && bash docs/experiments/device-snakemake-wheels.sh .device-wheels
# About 23 MB more (measured 2026-12-01; pulp carries its solver binaries), 45 MB with the project's: under
# the 64 MiB of carry. The call script installs every file of .device-wheels with --no-deps. Checked here in a
# Python 3.12 venv holding the image's packages: installed offline, `pip check` names only packaging 26 (the
# image's; snakemake asks for < 26 and runs with it), and a one-rule workflow ran.
set -euo pipefail
dest=${1:-.device-wheels}
mkdir -p "$dest"
pip=${PIP:-pip}
$pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  -d "$dest" snakemake==9.27.1 snakemake-executor-plugin-slurm==2.8.0 snakemake-executor-plugin-slurm-jobstep==0.6.1 \
  snakemake-interface-common==1.23.0 snakemake-interface-executor-plugins==9.4.0 \
  snakemake-interface-logger-plugins==2.1.0 snakemake-interface-report-plugins==1.3.0 \
  snakemake-interface-scheduler-plugins==2.0.2 snakemake-interface-storage-plugins==4.4.1 \
  argparse-dataclass==2.0.0 conda-inject==1.3.2 configargparse==1.9.0 docutils==0.22.4 dpath==2.2.0 \
  fastjsonschema==2.22.3 gitdb==4.0.12 gitpython==3.2.1 humanfriendly==10.0 jupyter-core==5.9.1 nbformat==5.11.1 \
  platformdirs==4.14.9 pulp==3.3.2 smart-open==7.7.1 smmap==5.0.3 sqlmodel==0.0.37 tenacity==9.2.1 throttler==1.2.3 \
  traitlets==5.16.1 yte==1.9.4 greenlet immutables "sqlalchemy<2.1"  # versions tested here; the last three: cp312 builds
$pip download -q --no-deps --no-binary=:all: -d "$dest" connection-pool==0.0.3  # a source archive only
du -sh "$dest"
