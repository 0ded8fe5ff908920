#!/usr/bin/env bash
# Issue 15's SVD-init family study on MiniLM-L6 GLUE (experiments/svd-family/) on one GPU.
#   phase 1: (a) seed 000's lr (4e-5) x 10 methods x 4 tasks x 3 seeds, and the lr sweep
#            (seed 0, 1 epoch, scored on a held-out 10 % of train), side by side;
#   phase 2: pick each method's best sweep lr per task, then (b) those lrs x 3 seeds.
# Runs are spread over $JOBS processes sharing the GPU (MiniLM steps are host-bound; one process
# leaves most of an H200 idle). Size: 360 runs, about 133k optimizer steps (a: 57.7k, sweep: 17.3k,
# b: 57.7k). Estimate, not measured: ~27 min in one process (6.9 ms/step as `loralab run` measured on
# an H100 with CUDA graphs, results/bench/README.md, plus ~2 s per run), ~5-7 min with JOBS=12 if the
# processes overlap as host-bound steps should. Knobs if it runs long: JOBS; SWEEP_LRS / SEEDS in
# scripts/make_svd_family_experiments.py. Expects .devdata/minilm-l6 (fp16 safetensors + tokenizer) and
# .devdata/glue/{RTE,MRPC,STS-B,CoLA} carried along (scripts/gpu_glue_minilm.sh's layout), and
# config.py to declare eval_split / holdout_fraction / holdout_seed. Results land in
# $OUT/results.tar.gz; make the tables with `loralab report`.
set -euo pipefail
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
export LORALAB_DATA_DIR=${LORALAB_DATA_DIR:-.devdata} LORALAB_PACKAGED_DIR=${LORALAB_PACKAGED_DIR:-.devdata}
OUT=${OUT:-$PWD/svd-family-out}
mkdir -p "$OUT"
export LORALAB_RESULTS_DIR=$OUT LORALAB_OUTPUT_DIR=${LORALAB_OUTPUT_DIR:-/tmp/loralab-outputs}
JOBS=${JOBS:-12}
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt" || true

run_sharded() {  # run_sharded NAME DIR...: the dirs dealt round-robin to $JOBS `loralab run` processes
  local name=$1; shift
  local -a dirs=("$@") pids=()
  for ((j = 0; j < JOBS; j++)); do
    local -a shard=()
    for ((i = j; i < ${#dirs[@]}; i += JOBS)); do shard+=("${dirs[i]}"); done
    ((${#shard[@]})) || continue
    "$PY" -m loralab run "${shard[@]}" >"$OUT/$name-$j.log" 2>&1 &
    pids+=($!)
  done
  local failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  grep -h "^svd-family" "$OUT/$name"-*.log | sort >"$OUT/$name.txt" || true
  echo "$name: $(wc -l <"$OUT/$name.txt") runs finished (failed shard: $failed)"
  return $failed
}

start=$(date +%s)
"$PY" scripts/make_svd_family_experiments.py
mapfile -t phase1 < <(ls -d experiments/svd-family/sweep/*/*/lr* experiments/svd-family/seed000-lr/*/*/seed*)
run_sharded phase1 "${phase1[@]}" || echo "phase 1: a shard failed (see $OUT/phase1-*.log); continuing"
echo "phase 1: $(($(date +%s) - start)) s"
"$PY" scripts/make_svd_family_experiments.py --pick "$OUT" | tee "$OUT/chosen_lr.txt"
cp experiments/svd-family/tuned/chosen_lr.json "$OUT/"
mapfile -t phase2 < <(ls -d experiments/svd-family/tuned/*/*/seed*)
run_sharded phase2 "${phase2[@]}" || echo "phase 2: a shard failed (see $OUT/phase2-*.log)"
echo "total: $(($(date +%s) - start)) s" | tee "$OUT/time.txt"
cd "$OUT" && tar czf results.tar.gz $(ls -d results temporary_results 2>/dev/null) chosen_lr.json
