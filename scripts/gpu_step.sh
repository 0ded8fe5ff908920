# Sourced by the GPU scripts (gpu_eval_bench.sh, gpu_fair_bench.sh, gpu_two_gpus.sh): one device call is
# one script run under a deadline. Needs OUT, DEADLINE (seconds for the whole call) and START ($SECONDS at
# the start); STEP_MIN_S (default 20) is the least time worth starting a step with; SUMMARY (default
# $OUT/summary.txt) the file of one line per step.

# step NAME CAP_SECONDS CMD...: run CMD under the smaller of its cap and what is left before the
# deadline; the command, its log and one summary line (exit code, seconds) land under $OUT
step() {
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - (SECONDS - START) - 5))
  local limit=$((cap < left ? cap : left))
  echo "$*" > "$OUT/$name.cmd"
  if [ "$limit" -lt "${STEP_MIN_S:-20}" ]; then
    echo "$name: skipped, ${left}s left before the deadline" | tee -a "${SUMMARY:-$OUT/summary.txt}"
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | grep -v "Warning\|warn(" | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc in $((SECONDS - t0))s (limit ${limit}s)" | tee -a "${SUMMARY:-$OUT/summary.txt}"
}
