#!/usr/bin/env bash
# The GPU preset of benchmarks/accuracy.py as one process per (setting, seed), all on one GPU at once.
#
#   bash benchmarks/accuracy_gpu.sh OUT_DIR [DATA_ROOT] [DEADLINE_S]
#
# These models are small enough that one process leaves the GPU idle between kernel launches, so six processes
# share it well. Each runs the methods in $METHODS order and appends every finished run to OUT_DIR/runs.jsonl;
# a process still busy at DEADLINE_S seconds is stopped, and what finished is summarised into
# OUT_DIR/accuracy.json (the same contract as benchmarks/results/accuracy.json). Logs: OUT_DIR/log-*.txt.
# SETTINGS, SEEDS, METHODS and EXTRA_ARGS (more accuracy.py flags) narrow or change the grid.
set -u
out=${1:?usage: accuracy_gpu.sh OUT_DIR [DATA_ROOT] [DEADLINE_S]}
root=${2:-/usr/share/datasets/fashion-mnist}
deadline=${3:-3000}
methods=${METHODS:-amalgam kd_slice amalgam+selflabel cfl_paper kd_concat supervised}
python=${PYTHON:-python3}
here=$(dirname "$0")
mkdir -p "$out"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
for setting in ${SETTINGS:-S2 S3}; do
  for seed in ${SEEDS:-0 1 2}; do
    # shellcheck disable=SC2086  # $methods is a word list
    timeout "$deadline" "$python" "$here/accuracy.py" --preset gpu --settings "$setting" --seeds "$seed" \
      --methods $methods ${EXTRA_ARGS:-} --data-root "$root" --work "${WORK:-/tmp/amalgam-bench-gpu}" \
      --out "/tmp/accuracy-$setting-$seed.json" --runs-log "$out/runs.jsonl" >"$out/log-$setting-$seed.txt" 2>&1 &
  done
done
wait
if [ -s "$out/runs.jsonl" ]; then
  "$python" "$here/accuracy.py" --from-runs "$out/runs.jsonl" --out "$out/accuracy.json"
else
  echo "no run finished within ${deadline} s: see $out/log-*.txt" >&2
  exit 1
fi
