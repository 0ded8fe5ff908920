#!/usr/bin/env bash
# One GPU call (H200) for issues 14 and 15, MiniLM-L6 on GLUE, many `loralab run` processes sharing
# the GPU (MiniLM steps are launch-bound: one process leaves most of an H200 idle):
#   glue   seed 000's GLUE recipe (experiments/glue-minilm: Full FT, LoRA, DoRA, PiSSA, CorDA IPA on
#          RTE, MRPC, STS-B) with seeds 0, 1, 2 (45 runs)
#   svd    experiments/svd-family/seed000-lr: 10 SVD-family methods x RTE, MRPC, STS-B, CoLA x
#          seeds 0-2 at seed 000's learning rate (120 runs; issue 15's part (a) only)
# Carry .devdata/minilm-l6 and .devdata/glue/{RTE,MRPC,STS-B,CoLA}. Results: $OUT/<part>.tar.gz.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 TQDM_DISABLE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export LORALAB_DATA_DIR=.devdata LORALAB_PACKAGED_DIR=.devdata LORALAB_OUTPUT_DIR=/tmp/outputs
# git state: the tree travels without .git, so records say commit/branch/dirty "unknown" unless the
# launcher states what it measured on its side, e.g. LORALAB_GIT_COMMIT=$(git rev-parse HEAD)
# LORALAB_GIT_BRANCH=$(git rev-parse --abbrev-ref HEAD) LORALAB_GIT_DIRTY=$(git status --porcelain -uno | grep -q . && echo 1 || echo 0);
# each record names the variables it took ("source": "given by ..."). Nothing is assumed here.
OUT=${OUT:-/tmp/out}; JOBS=${JOBS:-12}
mkdir -p "$OUT"
run_sharded() {  # run_sharded NAME LIMIT_S DIR...: dirs dealt round-robin to $JOBS processes
  local name=$1 limit=$2; shift 2
  local -a dirs=("$@") pids=()
  for ((j = 0; j < JOBS; j++)); do
    local -a shard=()
    for ((i = j; i < ${#dirs[@]}; i += JOBS)); do shard+=("${dirs[i]}"); done
    ((${#shard[@]})) || continue
    timeout "$limit" python -m loralab run "${shard[@]}" >"/tmp/$name-$j.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  echo "$name: $(grep -h ' -> ' /tmp/$name-*.log | wc -l) of ${#dirs[@]} runs finished"
  grep -h "^failed\|^error\|diverged" /tmp/$name-*.log | head -5
}
for part in "$@"; do
  start=$(date +%s)
  case $part in
    glue)
      export LORALAB_RESULTS_DIR=/tmp/res-glue
      dirs=()
      for seed in 0 1 2; do
        for m in full lora dora pissa corda; do for t in rte mrpc stsb; do
          d=/tmp/seeds/$seed/experiments/glue-minilm/$m/$t
          mkdir -p "$d" && cp experiments/glue-minilm/$m/$t/*.json "$d/"
          python -c "import json,sys; p='$d/training_parameters.json'; d=json.load(open(p)); d['seed']=$seed; json.dump(d, open(p,'w'))"
          dirs+=("$d")
        done; done
      done
      run_sharded glue 330 "${dirs[@]}"
      (cd /tmp/res-glue && tar czf "$OUT/glue.tar.gz" .) ;;
    svd)
      export LORALAB_RESULTS_DIR=/tmp/res-svd
      mapfile -t dirs < <(ls -d experiments/svd-family/seed000-lr/*/*/seed*)
      run_sharded svd 330 "${dirs[@]}"
      (cd /tmp/res-svd && tar czf "$OUT/svd.tar.gz" .) ;;
  esac
  echo "$part: $(($(date +%s) - start)) s"
done
tail -3 /tmp/*-0.log > "$OUT/logs_tail.txt"
