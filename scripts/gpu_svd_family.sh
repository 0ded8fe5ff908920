#!/usr/bin/env bash
# Issue 15's SVD-init family study and issue 14's LoRA-FA study on MiniLM-L6 GLUE, on one GPU, through
# `loralab run DIR... --gpus all --runs-per-gpu $JOBS` (MiniLM steps are launch-bound: one process
# leaves most of an H200 idle, so $JOBS runs share it).
#
#   bash scripts/gpu_svd_family.sh PART...     PART in:
#     sweep   experiments/svd-family/sweep: 10 methods x 4 tasks x lr {4e-5, 2e-4, 1e-3}, seed 0, one
#             epoch, scored on a held-out 10 % of train (120 short runs)
#     a       experiments/svd-family/seed000-lr: seed 000's lr 4e-5, seeds 0-2, dev (120 runs)
#     b       picks each method's best sweep lr per task (make_svd_family_experiments.py --pick), then
#             experiments/svd-family/tuned: those lrs, seeds 0-2, dev (120 runs)
#     lorafa  experiments/lorafa-svd-minilm: seed 003's grid (27 runs, 30 epochs each)
#
# Runs are ordered seed by seed, so a part cut short by the deadline has whole seeds first. The
# sweep skips every folder that already has a success result for the same configuration under
# $LORALAB_RESULTS_DIR, so a second call carrying the first call's results ($PRIOR, a results.tar.gz
# or a folder) goes on where the first stopped. DEADLINE_S (default 520) bounds the whole script:
# at the deadline the runs in flight get SIGTERM (each writes its `cancelled` record) and what
# finished is packed into $OUT/results.tar.gz (logs: $OUT/log.txt, $OUT/logs.tar.gz). With CUDA MPS available, an MPS daemon lets the
# processes' kernels run concurrently (checked with one CUDA call; without it, time-slicing).
# Carry .devdata/minilm-l6 and .devdata/glue/{RTE,MRPC,STS-B,CoLA}. Tables: `loralab report`.
set -uo pipefail
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export LORALAB_DATA_DIR=${LORALAB_DATA_DIR:-.devdata} LORALAB_PACKAGED_DIR=${LORALAB_PACKAGED_DIR:-.devdata}
export LORALAB_OUTPUT_DIR=${LORALAB_OUTPUT_DIR:-/tmp/loralab-outputs} LORALAB_RESULTS_DIR=${LORALAB_RESULTS_DIR:-/tmp/loralab-results}
OUT=${OUT:-$PWD/svd-family-out}; JOBS=${JOBS:-12}; DEADLINE_S=${DEADLINE_S:-520}; PRIOR=${PRIOR:-}
start=$(date +%s)
LOGS=/tmp/svd-family-logs
mkdir -p "$OUT" "$LORALAB_RESULTS_DIR" "$LOGS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/log.txt"
if [[ -f $PRIOR ]]; then tar xzf "$PRIOR" -C "$LORALAB_RESULTS_DIR"; elif [[ -d $PRIOR ]]; then cp -r "$PRIOR"/. "$LORALAB_RESULTS_DIR"/; fi
echo "prior results: $(find "$LORALAB_RESULTS_DIR" -name '*.json' | wc -l)" | tee -a "$OUT/log.txt"

if [[ ${MPS:-1} == 1 ]] && command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p /tmp/mps-pipe /tmp/mps-log
  if nvidia-cuda-mps-control -d && timeout 60 python -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
    echo "MPS: on" | tee -a "$OUT/log.txt"
  else
    echo quit | nvidia-cuda-mps-control 2>/dev/null; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "MPS: failed to start, time-slicing" | tee -a "$OUT/log.txt"
  fi
else
  echo "MPS: not used" | tee -a "$OUT/log.txt"
fi

sweep() {  # sweep NAME DIR...: one `loralab run --gpus` over the dirs, stopped at the deadline
  local name=$1; shift
  local left=$((start + DEADLINE_S - $(date +%s)))
  if ((left < 20)); then echo "$name: skipped, deadline" | tee -a "$OUT/log.txt"; return; fi
  local t0=$(date +%s)
  timeout -s TERM -k 45 "$left" python -m loralab run "$@" --gpus all --runs-per-gpu "$JOBS" >"/tmp/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc, $(grep -c '^done ' "/tmp/$name.log") done, $(grep -c '^skip ' "/tmp/$name.log") skipped," \
       "$(grep -c '^start ' "/tmp/$name.log") started of $# in $(($(date +%s) - t0)) s" | tee -a "$OUT/log.txt"
  grep -h "^exit\|^cancelled" "/tmp/$name.log" | head -5 | tee -a "$OUT/log.txt"
  cp "/tmp/$name.log" "$LOGS/"
}

python scripts/make_svd_family_experiments.py >/dev/null
for part in "$@"; do
  case $part in
    sweep) sweep sweep experiments/svd-family/sweep/*/*/lr* ;;
    a) sweep a experiments/svd-family/seed000-lr/*/*/seed0 experiments/svd-family/seed000-lr/*/*/seed1 \
                experiments/svd-family/seed000-lr/*/*/seed2 ;;
    b) if python scripts/make_svd_family_experiments.py --pick "$LORALAB_RESULTS_DIR" >"$LOGS/chosen_lr.txt" 2>&1; then
         cp experiments/svd-family/tuned/chosen_lr.json "$LOGS/"
         sweep b experiments/svd-family/tuned/*/*/seed0 experiments/svd-family/tuned/*/*/seed1 \
                 experiments/svd-family/tuned/*/*/seed2
       else
         echo "b: the sweep is incomplete: $(cat "$LOGS/chosen_lr.txt")" | tee -a "$OUT/log.txt"
       fi ;;
    lorafa) sweep lorafa experiments/lorafa-svd-minilm/*/* ;;
    *) echo "unknown part $part (allowed: sweep a b lorafa)"; exit 2 ;;
  esac
done
echo quit | nvidia-cuda-mps-control 2>/dev/null
echo "total: $(($(date +%s) - start)) s" | tee -a "$OUT/log.txt"
(cd "$LORALAB_RESULTS_DIR" && tar czf "$OUT/results.tar.gz" .)
cp -r "$LORALAB_OUTPUT_DIR/sweep-logs" "$LOGS/" 2>/dev/null
(cd "$LOGS" && tar czf "$OUT/logs.tar.gz" .)
