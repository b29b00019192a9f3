#!/usr/bin/env bash
# One device call of GPU round 2 (docs/benchmarks.md), from the repository root on the lent GPU machine:
#   bash docs/experiments/gpu_round2_call.sh PHASE:SECONDS...     PHASE: bench | tests | more
# bench: the training rows (gpu_round2.py); tests: pytest -m gpu (compiled by default now); more: sampling,
# batch 2x under the 64 GB cap, and what fits of the rest. Each phase gets SECONDS (its sections do not
# start past that; pytest is stopped at it), counted from the phase's start.
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
resume=(); [ -f /tmp/gpu_round2_last.json ] && resume=(--resume-json /tmp/gpu_round2_last.json)
for item in "$@"; do
  phase=${item%%:*}; left=${item##*:}
  deadline=$(( $(date +%s) + left ))
  echo "== phase $phase, $left s"
  case $phase in
    bench) python3 docs/experiments/gpu_round2.py --out "$out" --deadline "$deadline" "${resume[@]}" \
             --sections env ceilings flops baseline eager compiled compiled_cl b4_capped eager_lpnorm layout 2>&1 \
             | grep -v "^\[20.*WARNING" | tee "$out/bench.log" | tail -n 60
           resume=(--resume-json /tmp/gpu_round2_last.json) ;;
    tests) timeout $(( left > 30 ? left - 10 : 20 )) python3 -m pytest -m gpu tests/test_gpu.py -q -rA \
             -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.log" | grep -E "PASS|FAIL|ERROR|passed|failed|Error" | tail -n 40 ;;
    more) python3 docs/experiments/gpu_round2.py --out "$out" --deadline "$deadline" "${resume[@]}" \
             --sections sampling b4_capped compiled_lpnorm max_autotune 2>&1 \
             | grep -v "^\[20.*WARNING" | tee "$out/more.log" | tail -n 60 ;;
  esac
done
echo "== done"
