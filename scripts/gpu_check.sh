#!/usr/bin/env bash
# One device call: the kernel tests compiled on the GPU, then benchmarks/kernel_speed.py, logs and tables under $OUT.
# Runs on a machine that has torch, Triton, transformers and peft but no registry: the package is put on PYTHONPATH
# as it installs (hf_deltacome/ with kernels/ as hf_deltacome/kernels), nothing is pip-installed.
#   OUT=/tmp/out bash scripts/gpu_check.sh [tests|bench|all] [extra kernel_speed.py arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/deltacome_gpu}"
mkdir -p "$OUT"
what="${1:-all}"
shift || true
case "$what" in
    tests | bench | all) ;;
    *) echo "gpu_check.sh: first argument must be tests, bench or all, got '$what'" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache
site=/tmp/deltacome_site
rm -rf "$site" && mkdir -p "$site"
cp -r hf_deltacome "$site/" && cp -r kernels "$site/hf_deltacome/kernels" && cp -r model_cards "$site/hf_deltacome/model_cards"
export PYTHONPATH="$site"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/device.txt"
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
    SECONDS=0
    # first tuning candidate only: the tests check results, and tuning every test shape took > 150 s on an H200.
    # The DARE kernel's tests first (its mask hashed in the kernel since format 5, or read as a bitmap), with a
    # budget of their own: the whole file did not fit the time a call had so far.
    DELTACOME_KERNEL_TUNING=first PYTHONSAFEPATH=1 timeout "${DARE_TEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider -W ignore -m "not slow" tests/test_kernels.py -k dare -rA 2>&1 \
        | tail -n 60 | tee "$OUT/tests_dare.log"
    rc=${PIPESTATUS[0]}
    echo "DARE kernel tests: rc=$rc in ${SECONDS}s" | tee -a "$OUT/tests_dare.log"
    SECONDS=0
    DELTACOME_KERNEL_TUNING=first PYTHONSAFEPATH=1 timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -W ignore -m "not slow" tests/test_kernels.py -k "not dare" -rA 2>&1 \
        | tail -n 80 | tee "$OUT/tests.log"
    rest=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] || rc=$rest
    echo "kernel tests: rc=$rest in ${SECONDS}s" | tee -a "$OUT/tests.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    SECONDS=0
    timeout "${BENCH_TIMEOUT:-280}" python3 benchmarks/kernel_speed.py --markdown "$OUT/kernels_gpu.md" --plot "$OUT/kernels_gpu.png" "$@" \
        2>&1 | grep --line-buffered -v -i "warn" | tee "$OUT/bench.log"
    echo "benchmark: rc=${PIPESTATUS[0]} in ${SECONDS}s" | tee -a "$OUT/bench.log"
fi
exit "$rc"
