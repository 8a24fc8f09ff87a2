#!/usr/bin/env bash
# Set up and run the test suite. `.ci/run` calls exactly this.
# Extra arguments go to pytest. Slow real-model tests run unless DELTACOME_SKIP_SLOW=1.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || { echo "setup failed" >&2; exit 1; }
PY="${PYTHON:-python3}"
MARK=()
if [ "${DELTACOME_SKIP_SLOW:-0}" = "1" ]; then MARK=(-m "not slow"); fi
"$PY" -m ruff check hf_deltacome kernels tests examples benchmarks || exit 1
PYTHONSAFEPATH=1 "$PY" -m pytest -q -p no:cacheprovider --durations=15 "${MARK[@]}" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit "$rc"
