#!/usr/bin/env bash
# Issue 19's generation measurements on one H200, each call in < 9 minutes with a deadline guard:
#   bench8b     loralab bench --eval at the Llama-3-8B shape (random bf16 weights, LoRA r32 all-linear
#               unmerged in the model): engine on all 1,319 GSM8K test prompts x 256 new tokens (no stop
#               strings, EOS off); transformers generate (batch 64 and 128) and generate_batch on the
#               first PEER_PROMPTS prompts, their full-task seconds extrapolated
#   gsm8k       loralab eval --model random:llama-3-8b --adapter <LoRA r32>: the full test set at
#               1,024-token budgets (seed 000's protocol; goal: <= 3 minutes including loading and scoring)
#   smollm2     the bench rows on SmolLM2-135M-Instruct (real weights) with GSM8K's source stop strings
#   commonsense the commonsense test sets at 32 new tokens, greedy (num_beams 1: the engine; beam
#               search stays on transformers); hellaswag only when its LLM-Adapters file is in $DATA
# Usage: here, once:  bash scripts/gpu_eval_bench.sh prepare        (fills .devdata and .whl)
#   device call 1: carry .devdata/gsm8k .devdata/llm-adapters .devdata/smollm2-135m .devdata/smollm2-gguf-a
#                  command: OUT=$OUT bash scripts/gpu_eval_bench.sh stage bench8b gsm8k
#   device call 2, at once (same warm machine): carry .devdata/gsm8k .devdata/llm-adapters
#                  .devdata/smollm2-135m .devdata/smollm2-gguf-b .whl
#                  command: OUT=$OUT bash scripts/gpu_eval_bench.sh smollm2 commonsense
# SmolLM2's GGUF (98 MB) is over one call's 64 MiB carry, so it travels in two halves; its tokenizer
# folder (.devdata/smollm2-135m) also serves the random shapes. The evaluations load a LoRA r32
# all-linear adapter with random B (as a trained run's adapter), saved by the first part that needs it.
# Every step writes <step>.log, <step>.json and <step>.cmd (the exact command) under $OUT;
# summary.txt has each step's exit status and seconds (124: stopped by the deadline).
set -uo pipefail
DATA=${DATA:-.devdata}
if [ "${1:-}" = prepare ]; then
  set -e
  src=${LORALAB_DATA_DIR:-../shared/data} py=${PYTHON:-.venv/bin/python}
  mkdir -p .devdata/gsm8k
  cp "$src/gsm8k/test.jsonl" .devdata/gsm8k/
  for t in boolq piqa social_i_qa hellaswag winogrande ARC-Easy ARC-Challenge openbookqa; do
    if [ -f "$src/llm-adapters/dataset/$t/test.json" ]; then
      mkdir -p ".devdata/llm-adapters/dataset/$t" && cp "$src/llm-adapters/dataset/$t/test.json" ".devdata/llm-adapters/dataset/$t/"
    fi
  done
  PYTHON=$py bash scripts/prepare_smollm2_devdata.sh
  du -sh .devdata/* .whl
  exit 0
fi

export PYTHONPATH=src PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=src:/tmp/site
fi
OUT=${OUT:-/tmp/out}
PYTHON=${PYTHON:-python}
PEER_PROMPTS=${PEER_PROMPTS:-128}
DEADLINE=${DEADLINE:-540}  # seconds for the whole call (a device command may take 600)
export LORALAB_DATA_DIR=$DATA LORALAB_PACKAGED_DIR=${PACKAGED_DIR:-$DATA}
ADAPTER=/tmp/lora-r32-8b
SMOLLM2=/tmp/smollm2/$(cat "$DATA/smollm2-gguf-b/NAME" 2>/dev/null || echo SmolLM2-135M-Instruct.Q4_1.gguf)
mkdir -p "$OUT" /tmp/smollm2
START=$SECONDS
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(stage bench8b gsm8k smollm2 commonsense)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PYTHON -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
echo "git: the device copy of the tree carries no git state of its own; the commit that ran is in results/eval-bench/README.md" | tee -a "$OUT/gpu.txt"

source "$(dirname "$0")/gpu_step.sh"  # step NAME CAP_SECONDS CMD...

make_adapter() {  # a LoRA r32 all-linear adapter of the 8B shape with random B, saved once per machine
  [ -f "$ADAPTER/adapter_config.json" ] && return
  local t0=$SECONDS
  $PYTHON - "$ADAPTER" > "$OUT/adapter.log" 2>&1 <<'EOF'
import sys
from peft import LoraConfig, get_peft_model
from loralab.models import load_model
model = load_model("random:llama-3-8b", "causal_lm", dtype="bfloat16")
model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", init_lora_weights=False))
model.save_pretrained(sys.argv[1])
print("adapter saved to", sys.argv[1])
EOF
  echo "adapter: saved in $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

COMMONSENSE=""
for t in boolq piqa social_i_qa hellaswag winogrande ARC-Easy ARC-Challenge openbookqa; do
  if [ -f "$DATA/llm-adapters/dataset/$t/test.json" ]; then COMMONSENSE=$COMMONSENSE${COMMONSENSE:+,}$t
  else echo "commonsense: no $DATA/llm-adapters/dataset/$t/test.json here, $t left out" >> "$OUT/summary.txt"; fi
done

for part in "${PARTS[@]}"; do
  case $part in
    stage)  # keep the first GGUF half on this machine for the next call
      [ -f "$DATA/smollm2-gguf-a/part" ] && cp "$DATA/smollm2-gguf-a/part" /tmp/smollm2/part-a
      echo "stage: $(ls /tmp/smollm2)" | tee -a "$OUT/summary.txt" ;;
    bench8b)
      step bench8b 200 $PYTHON -m loralab bench --eval --model random:llama-3-8b --device cuda --max-new-tokens 256 \
        --batch-sizes 64,128 --peer-prompts "$PEER_PROMPTS" --output "$OUT/bench8b.json" ;;
    genbatch)  # transformers' generate_batch alone (in bench8b it ran past the step's cap)
      step genbatch 200 $PYTHON -m loralab bench --eval --model random:llama-3-8b --device cuda --max-new-tokens 256 \
        --rows generate_batch --peer-prompts 64 --output "$OUT/genbatch.json" ;;
    gsm8k)
      make_adapter
      step gsm8k 240 $PYTHON -m loralab eval --model random:llama-3-8b --adapter "$ADAPTER" --tasks gsm8k \
        --max-new-tokens 1024 --dtype bfloat16 --device cuda --output "$OUT/gsm8k.json" ;;
    smollm2)
      if [ -f /tmp/smollm2/part-a ] && [ -f "$DATA/smollm2-gguf-b/part" ]; then
        cat /tmp/smollm2/part-a "$DATA/smollm2-gguf-b/part" > "$SMOLLM2"
      fi
      if [ ! -f "$SMOLLM2" ] || [ "$(sha256sum "$SMOLLM2" | cut -d' ' -f1)" != "$(cat "$DATA/smollm2-gguf-b/SHA256" 2>/dev/null)" ]; then
        echo "smollm2: skipped, the GGUF halves are not both on this machine (see the header)" | tee -a "$OUT/summary.txt"
        continue
      fi
      step smollm2 150 $PYTHON -m loralab bench --eval --model "$SMOLLM2" --device cuda --max-new-tokens 256 \
        --stopping source --batch-sizes 64,128 --peer-prompts "$PEER_PROMPTS" --output "$OUT/smollm2.json" ;;
    commonsense)
      make_adapter
      step commonsense 300 $PYTHON -m loralab eval --model random:llama-3-8b --adapter "$ADAPTER" --tasks "$COMMONSENSE" \
        --max-new-tokens 32 --options '{"num_beams": 1}' --dtype bfloat16 --device cuda --output "$OUT/commonsense.json" ;;
    *) echo "unknown part $part (known: prepare stage bench8b genbatch gsm8k smollm2 commonsense)"; exit 2 ;;
  esac
done
echo "total $((SECONDS - START))s" | tee -a "$OUT/summary.txt"
