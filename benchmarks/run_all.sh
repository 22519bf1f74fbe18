#!/usr/bin/env bash
# Run every benchmarks/*.py in turn with its default (full) settings; each prints its own ratio
# against the baseline it measures in the same run. Extra arguments go to every script.
# Usage: bash benchmarks/run_all.sh            (make bench runs this inside .venv)
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
failed=()
for script in benchmarks/*.py; do
    echo "=== $script ($(date '+%Y-%m-%d %H:%M:%S'))"
    if ! "$PY" "$script" "$@"; then
        failed+=("$script")
    fi
done
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
