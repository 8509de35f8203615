#!/usr/bin/env bash
# The GPU preset of benchmarks/accuracy.py as many processes sharing one GPU.
#
#   bash benchmarks/accuracy_gpu.sh OUT_DIR [DATA_ROOT] [DEADLINE_S]
#
# These models are small enough that one process leaves the GPU idle between kernel launches, so several
# processes share it well. Each (setting, seed) is a chain: its teachers train at once, each in a process of its
# own (cached under $WORK, so a second call on the same machine skips them), and as soon as they are done one
# process runs the methods in $METHODS order and appends every finished run to OUT_DIR/runs.jsonl; a slow
# teacher holds back only its own chain. Whatever is still busy at DEADLINE_S seconds after the start is
# stopped, and what finished is summarised into OUT_DIR/accuracy.json (the same contract as
# benchmarks/results/accuracy.json). Logs: OUT_DIR/log-*.txt. SETTINGS, SEEDS, METHODS and EXTRA_ARGS (more
# accuracy.py flags) narrow or change the grid.
#
# METHODS may hold lanes separated by '|': each lane of a chain is a process of its own, its methods in order, so
# METHODS="kd_slice cfl_paper|amalgam+selflabel" runs two students of each chain at once and puts cfl_paper last.
# BASELINE holds the methods of one more lane that runs only for the seeds in BASELINE_SEEDS (default: all), on the
# same teachers: BASELINE=amalgam BASELINE_SEEDS=0 gives a new method a paired baseline in the same call.
# A process that fails or meets the deadline is listed at the end (OUT_DIR/failures.txt) and the script exits 1,
# after summarising what finished; a chain whose teacher failed runs no students.
# MPS=1 starts CUDA's Multi-Process Service first, so that the processes' small kernels run side by side instead
# of taking turns on the GPU; if the daemon does not start or a CUDA context fails under it, the grid runs
# without it (the log says which). A daemon already running is used and left running.
set -u
out=${1:?usage: accuracy_gpu.sh OUT_DIR [DATA_ROOT] [DEADLINE_S]}
root=${2:-/usr/share/datasets/fashion-mnist}
deadline=${3:-3000}
methods=${METHODS:-amalgam kd_slice amalgam+teacher_flip cfl_paper kd_concat supervised}
python=${PYTHON:-python3}
here=$(dirname "$0")
work=${WORK:-/tmp/amalgam-bench-gpu}
mkdir -p "$out"
rm -f "$out/failures.txt"  # from an earlier grid into the same folder
# One thread each: a process spends its CPU time launching kernels, and many share the cores.
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1

common=(--preset gpu --data-root "$root" --work "$work")
mps_ours=0  # a daemon this script started, and so stops; one already running (started by a caller) stays
if [ "${MPS:-0}" = 1 ]; then
  if pgrep -x nvidia-cuda-mps-control >/dev/null; then
    echo "[accuracy_gpu] MPS already on"
  elif nvidia-cuda-mps-control -d && timeout 60 "$python" -c "import torch; torch.ones(1, device='cuda').sum().item()"
  then
    mps_ours=1
    echo "[accuracy_gpu] MPS on"
  else
    echo quit | nvidia-cuda-mps-control 2>/dev/null
    echo "[accuracy_gpu] MPS did not start; running without it"
  fi
fi
failed() {  # what: one line in OUT_DIR/failures.txt, listed at the end
  echo "[accuracy_gpu] $*" >>"$out/failures.txt"
}
chain() {  # setting seed: its teachers in parallel, then its students
  local setting=$1 seed=$2 tasks="a b" pids=() names=() i rc left
  [ "$setting" = S3 ] && tasks="a b c"
  left=$((deadline - SECONDS))
  for task in $tasks; do
    # shellcheck disable=SC2086  # EXTRA_ARGS is a word list
    timeout "$((left > 1 ? left : 1))" "$python" "$here/accuracy.py" "${common[@]}" --teachers-only \
      --settings "$setting" --seeds "$seed" --tasks "$task" ${EXTRA_ARGS:-} \
      >"$out/log-teacher-$setting-$seed-$task.txt" 2>&1 &
    pids+=($!) names+=("teacher $task")
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" && continue
    rc=$?
    # Its students would each train the missing teacher at once, racing on one file: they do not start.
    failed "$setting seed $seed: ${names[$i]} exited $rc$([ $rc = 124 ] && echo ' (deadline)'); its students" \
      "did not run (log-teacher-$setting-$seed-*.txt)"
    return 1
  done
  local lane=0 lanes lane_methods extra="" m
  left=$((deadline - SECONDS)) pids=() names=()
  IFS='|' read -ra lanes <<<"$methods"
  if [ -n "${BASELINE:-}" ] && [[ " ${BASELINE_SEEDS:-$seed} " == *" $seed "* ]]; then
    for m in $BASELINE; do  # a baseline already in METHODS would run, and be logged, twice
      [[ " ${methods//|/ } " == *" $m "* ]] || extra+="$m "
    done
    [ -n "$extra" ] && lanes+=("$extra")
  fi
  for lane_methods in "${lanes[@]}"; do
    lane=$((lane + 1))
    # shellcheck disable=SC2086  # $lane_methods and EXTRA_ARGS are word lists
    timeout "$((left > 1 ? left : 1))" "$python" "$here/accuracy.py" "${common[@]}" --settings "$setting" \
      --seeds "$seed" --methods $lane_methods ${EXTRA_ARGS:-} --out "/tmp/accuracy-$setting-$seed-$lane.json" \
      --runs-log "$out/runs.jsonl" >"$out/log-$setting-$seed-$lane.txt" 2>&1 &
    pids+=($!) names+=("lane $lane ($lane_methods)")
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" && continue
    rc=$?
    failed "$setting seed $seed: ${names[$i]} exited $rc$([ $rc = 124 ] && echo ' (deadline)')" \
      "(log-$setting-$seed-$((i + 1)).txt)"
  done
}
for setting in ${SETTINGS:-S2 S3}; do
  for seed in ${SEEDS:-0 1 2}; do
    chain "$setting" "$seed" &
  done
done
wait
[ $mps_ours = 1 ] && echo quit | nvidia-cuda-mps-control 2>/dev/null
status=0
if [ -s "$out/runs.jsonl" ]; then
  "$python" "$here/accuracy.py" --from-runs "$out/runs.jsonl" --out "$out/accuracy.json" || status=1
else
  echo "no run finished within ${deadline} s: see $out/log-*.txt" >&2
  status=1
fi
if [ -s "$out/failures.txt" ]; then  # a partial grid is still summarised above, but does not pass as whole
  cat "$out/failures.txt" >&2
  status=1
fi
exit $status
