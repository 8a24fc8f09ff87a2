#!/usr/bin/env bash
# One device call that times the kernels of an older revision and of the working tree side by side (same machine,
# same run: the only way to tell a change from run-to-run and autotuning spread). Prepare the old tree first:
#   mkdir ab_old && git archive REV hf_deltacome kernels benchmarks model_cards | tar -x -C ab_old
#   OUT=/tmp/out bash scripts/gpu_ab.sh ab_old [kernel_speed.py arguments]   (then rm -rf ab_old)
# Each tree runs its own benchmarks/kernel_speed.py with the package put on PYTHONPATH (nothing pip-installed);
# tables under $OUT as ab_old.md and ab_new.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/deltacome_gpu}"
old="${1:?usage: gpu_ab.sh OLD_TREE [kernel_speed.py arguments]}"
shift
[ -f "$old/benchmarks/kernel_speed.py" ] || { echo "gpu_ab.sh: $old holds no benchmarks/kernel_speed.py" >&2; exit 2; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache
site() {  # $1 tree, $2 site dir: hf_deltacome with kernels/ as hf_deltacome/kernels, as it installs
    rm -rf "$2" && mkdir -p "$2"
    cp -r "$1/hf_deltacome" "$2/" && cp -r "$1/kernels" "$2/hf_deltacome/kernels" && cp -r "$1/model_cards" "$2/hf_deltacome/"
}
site "$old" /tmp/ab_site_old
site . /tmp/ab_site_new
for which in old new; do
    tree=.
    [ "$which" = old ] && tree="$old"
    SECONDS=0
    PYTHONPATH=/tmp/ab_site_$which timeout "${AB_TIMEOUT:-150}" python3 "$tree/benchmarks/kernel_speed.py" \
        --markdown "$OUT/ab_$which.md" --plot '' "$@" 2>&1 | grep --line-buffered -v -i "warn" | tee "$OUT/ab_$which.log"
    echo "$which: rc=${PIPESTATUS[0]} in ${SECONDS}s" | tee -a "$OUT/ab_$which.log"
done
