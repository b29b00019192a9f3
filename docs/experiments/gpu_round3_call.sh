#!/usr/bin/env bash
# One device call of GPU round 3 (docs/benchmarks.md, "GPU round 3"), from the repository root on the lent GPU:
#   bash docs/experiments/gpu_round3_call.sh PHASE:SECONDS...     PHASE: bench | smoke
# bench: gpu_round3.py's sections, most wanted first (the latent model, then the compile modes); no section
#        starts past SECONDS, and the unbounded compiles (max-autotune, the compiled autoencoder) are killed
#        at it. A second call on the still-warm machine resumes: measured sections are kept, skipped and
#        failed ones run again (the rerun).
# smoke: the one-GPU latent dry run (config/gpu-smoke-latent.yaml) under `timeout SECONDS`; needs snakemake,
#        which is not on the machine's image: add its wheels to .device-wheels first
#        (docs/experiments/device-snakemake-wheels.sh).
# The project's wheels (.device-wheels, carried) are installed only where they are missing.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
if ! python3 -c "import monai, deepspeed, submitit, nibabel" 2>/dev/null; then
  t=$(date +%s)
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir .device-wheels/* \
    > "$out/pip.log" 2>&1 || { tail -20 "$out/pip.log"; exit 3; }
  echo "installed the project's wheels in $(( $(date +%s) - t )) s"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv | tee -a "$out/nvidia-smi.txt"
for item in "$@"; do
  phase=${item%%:*}; left=${item##*:}
  deadline=$(( $(date +%s) + left ))
  echo "== phase $phase, $left s"
  case $phase in
    bench) resume=(); [ -f /tmp/gpu_round3_last.json ] && resume=(--resume-json /tmp/gpu_round3_last.json)
           python3 docs/experiments/gpu_round3.py --out "$out" --deadline "$deadline" "${resume[@]}" 2>&1 \
             | grep -v "^\[20.*WARNING" | tee -a "$out/bench.log" | tail -n 40 ;;
    smoke) if ! python3 -c "import snakemake" 2>/dev/null; then
             echo "smoke: snakemake is not installed here; carry its wheels to run the latent dry run"; continue
           fi
           command -v brainddpm >/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . \
             >> "$out/pip.log" 2>&1
           t=$(date +%s)
           timeout "$left" snakemake --profile profiles/local --configfile config/config.yaml config/latent.yaml \
             config/gpu-smoke-latent.yaml --resources gpu_jobs=1 > "$out/smoke.log" 2>&1
           echo "smoke: rc $? after $(( $(date +%s) - t )) s"
           tail -n 15 "$out/smoke.log"
           for f in results/gpu-smoke-latent/benchmarks/*.tsv; do
             [ -f "$f" ] && printf '%s\t%s\n' "$(basename "$f" .tsv)" "$(sed -n 2p "$f" | cut -f1)"
           done | tee "$out/smoke-benchmarks.txt" ;;
    *) echo "unknown phase $phase" ;;
  esac
done
echo "== done"
