#!/usr/bin/env bash
# Issue 23's measurements on kind nvidia-h200-x2 (2 H200s, NCCL), one device call per part (each < 10
# minutes, with a deadline guard); files for results/distributed/issue23/:
#   scaling  Llama-3-8B shape (random bf16 weights), LoRA r32 on every decoder linear layer, 4 rows x 512
#            tokens per GPU, the step `loralab run` builds with its defaults (scripts/gpu_distributed.py
#            speed): 1 GPU with CUDA graphs (the default) and without; 2 GPUs under torchrun at the same
#            per-GPU batch (optimizer batch 8 x 512) with DDP (speed.grad_reduce "ddp": CUDA graphs off)
#            and with the gradients summed after the backward, outside the graphs ("after_backward").
#            Scaling = the better 2-GPU tokens/s over the better 1-GPU tokens/s (goal >= 1.9x).
#   recipe   the shipped seed 000 math recipe (experiments/llm/seed000-llama3-8b-math/lora: 1 x 128
#            accumulation, max_length 512, cosine, bf16) at the 8B shape with random weights, GSM8K train
#            rows standing in for MetaMathQA (not on disk), `loralab run` for 6 optimizer steps: 1 GPU,
#            then torchrun on 2 GPUs (same optimizer batch, grad_reduce ddp and after_backward); each
#            record's tokens/s, CUDA memory of rank 0 and loss per step.
#   eval     `loralab eval --model random:llama-3-8b --adapter <LoRA r32> --tasks gsm8k` at 1,024-token
#            budgets (all 1,319 test problems, loralab's engine) on 1 GPU, then under torchrun on 2 GPUs
#            (each rank its share of the prompts); new tokens/s and identical completions.
# Usage: here, once:  bash scripts/gpu_two_gpus.sh prepare   (fills the ignored .devdata/: GSM8K, SmolLM2's
#           tokenizer folder, which random: shapes use)
#   device calls (kind nvidia-h200-x2; carry .devdata/gsm8k .devdata/smollm2-135m):
#           LORALAB_GIT_COMMIT=<the commit measured> OUT=$OUT bash scripts/gpu_two_gpus.sh scaling
#           ... recipe   and   ... eval   (one part per call)
#   Each call writes gpu-<part>.txt and summary-<part>.txt (the card and versions; each step's exit status
#   and seconds) beside its part's files, so the three calls' files go into one folder,
#   results/distributed/issue23/, without overwriting each other; then, here:
#           python scripts/two_gpus_summary.py results/distributed/issue23   (summary.json, the README table)
#   PYTHON (default python3) must import torch, transformers and peft: the device's python3 does (torch 2.11,
#   transformers 5.17, peft 0.21 when this was written); nothing is installed by the script.
#   Budgets: the eval part's 1-GPU step decoded the 1,319 x 1,024 tokens in 143 s on one H200
#   (results/eval-bench/h200-gsm8k-1024.json); each other step is a model build, a compile and a few
#   steps (1-2 min). A step stopped at its cap (exit 124 in summary-<part>.txt) or skipped at the deadline:
#   run its part again alone in a new call.
# A dry run on CPU (2 gloo processes, SmolLM2's shape cut to 2 layers, a few steps and problems):
#           DRY=1 OUT=/tmp/dry bash scripts/gpu_two_gpus.sh prepare-dry scaling recipe eval
# Every step writes <step>.log and <step>.cmd under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  set -e
  src=${LORALAB_DATA_DIR:-../shared/data} py=${PYTHON:-.venv/bin/python}
  mkdir -p .devdata/gsm8k
  cp "$src/gsm8k/train.jsonl" "$src/gsm8k/test.jsonl" .devdata/gsm8k/
  PYTHON=$py bash scripts/prepare_smollm2_devdata.sh  # also writes GGUF halves this script does not need
  du -sh .devdata/gsm8k .devdata/smollm2-135m
  exit 0
fi

export PYTHONPATH=src PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
# NVLink multicast stays off (KINDS.md): NCCL, PyTorch symmetric memory and NVSHMEM
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
PYTHON=${PYTHON:-python3}
DEADLINE=${DEADLINE:-570}  # seconds for the whole call (a device command may take 600)
mkdir -p "$OUT"
TAG=$(IFS=-; echo "$*")
SUMMARY="$OUT/summary-$TAG.txt"
START=$SECONDS
TORCHRUN="$PYTHON -m torch.distributed.run --standalone --nproc_per_node=2"
if [ "${DRY:-0}" = 1 ]; then  # CPU rehearsal: the same commands on a cut shape
  export OMP_NUM_THREADS=1 LORALAB_DATA_DIR=${LORALAB_DATA_DIR:-../shared/data}
  DEVICE=cpu ONE="" SHAPE="--device cpu --shape smollm2-135m --layers 2 --length 64 --warmup 1 --steps 2"
  MODEL=random:smollm2-135m RECIPE_EXTRA='{"max_steps": 2, "gradient_accumulation_steps": 4, "max_train_samples": 64, "max_length": 128, "device": "cpu"}'
  EVAL_EXTRA="--max-samples 6 --max-new-tokens 8 --dtype float32"
else
  export LORALAB_DATA_DIR=.devdata LORALAB_PACKAGED_DIR=.devdata
  DEVICE=cuda ONE="env CUDA_VISIBLE_DEVICES=0" SHAPE="--warmup 3 --steps 20"
  MODEL=random:llama-3-8b RECIPE_EXTRA='{"max_steps": 6}'
  EVAL_EXTRA="--max-new-tokens 1024 --dtype bfloat16"
fi
ADAPTER=/tmp/two-gpus-adapter-${MODEL//[:\/]/-}  # one per model shape

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU: dry run on $(getconf _NPROCESSORS_ONLN) CPU cores"
  $PYTHON -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'gpus', torch.cuda.device_count())"
  echo "commit: ${LORALAB_GIT_COMMIT:-unknown (the tree travels without .git; the launcher names it)}"
  echo "model: $MODEL"
} | tee "$OUT/gpu-$TAG.txt"

source scripts/gpu_step.sh  # step NAME CAP_SECONDS CMD...

json_line() {  # the last JSON line of a step's log -> NAME.json
  grep -h '^{' "$OUT/$1.log" | tail -1 > "$OUT/$1.json"
  [ -s "$OUT/$1.json" ] || rm -f "$OUT/$1.json"
}

recipe_folder() {  # the shipped recipe with the overrides above, as an experiment folder: $1 = name, $2 = grad_reduce
  $PYTHON - "$1" "$2" "$MODEL" "$RECIPE_EXTRA" <<'EOF'
import json, shutil, sys
from pathlib import Path
name, reduce, model, extra = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
src, dst = Path("experiments/llm/seed000-llama3-8b-math/lora"), Path("/tmp/two-gpus/experiments/seed000") / name
shutil.rmtree(dst, ignore_errors=True)
dst.mkdir(parents=True)
shutil.copy(src / "adapter_config.json", dst)
params = json.loads((src / "training_parameters.json").read_text())
params.pop("eval_options", None)
params.update(model_id=model, task="gsm8k", eval_tasks=[], checkpoint_steps=0, logging_steps=1,
              speed={"grad_reduce": reduce}, **extra)
(dst / "training_parameters.json").write_text(json.dumps(params, indent=1))
print(dst)
EOF
}

recipe_record() {  # the run's record -> NAME.json
  local f
  f=$(find "/tmp/two-gpus/res-$1" -name '*.json' | head -1)
  [ -n "$f" ] && cp "$f" "$OUT/$1.json"
}

make_adapter() {  # a LoRA r32 all-linear adapter of the shape with random B (as a trained run's), once
  [ -f "$ADAPTER/adapter_config.json" ] && return
  $PYTHON - "$ADAPTER" "$MODEL" <<'EOF' > "$OUT/adapter.log" 2>&1
import sys
from peft import LoraConfig, get_peft_model
from loralab.models import load_model
model = load_model(sys.argv[2], "causal_lm", dtype="bfloat16")
model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", init_lora_weights=False))
model.save_pretrained(sys.argv[1])
print("adapter saved to", sys.argv[1])
EOF
}

for part in "$@"; do
  case $part in
    prepare-dry) ;;  # nothing to carry on CPU: the data folder is read in place
    scaling)
      step speed_1gpu 150 $ONE $PYTHON scripts/gpu_distributed.py speed $SHAPE --batch 4
      json_line speed_1gpu
      step speed_1gpu_nographs 150 $ONE $PYTHON scripts/gpu_distributed.py speed $SHAPE --batch 4 --no-graphs
      json_line speed_1gpu_nographs
      step speed_2gpu_ddp 150 $TORCHRUN scripts/gpu_distributed.py speed $SHAPE --batch 8
      json_line speed_2gpu_ddp
      step speed_2gpu_after_backward 150 $TORCHRUN scripts/gpu_distributed.py speed $SHAPE --batch 8 --grad-reduce after_backward
      json_line speed_2gpu_after_backward ;;
    recipe)
      rm -rf /tmp/two-gpus/res-* /tmp/two-gpus/out-*
      for name in recipe_1gpu recipe_2gpu_ddp recipe_2gpu_after_backward; do
        reduce=ddp; [ "$name" = recipe_2gpu_after_backward ] && reduce=after_backward
        dir=$(recipe_folder "$name" "$reduce")
        launcher=$TORCHRUN; [ "$name" = recipe_1gpu ] && launcher="$ONE $PYTHON"
        step "$name" 180 env LORALAB_RESULTS_DIR="/tmp/two-gpus/res-$name" LORALAB_OUTPUT_DIR="/tmp/two-gpus/out-$name" \
          $launcher -m loralab run "$dir"
        recipe_record "$name"
      done ;;
    eval)
      make_adapter
      step eval_1gpu 260 $ONE $PYTHON -m loralab eval --model "$MODEL" --adapter "$ADAPTER" --tasks gsm8k $EVAL_EXTRA \
        --device "$DEVICE" --output "$OUT/eval_1gpu.json" --generations-out "$OUT/eval_1gpu.jsonl"
      step eval_2gpu 200 $TORCHRUN -m loralab eval --model "$MODEL" --adapter "$ADAPTER" --tasks gsm8k $EVAL_EXTRA \
        --device "$DEVICE" --output "$OUT/eval_2gpu.json" --generations-out "$OUT/eval_2gpu.jsonl" ;;
    *) echo "unknown part $part (known: prepare prepare-dry scaling recipe eval)"; exit 2 ;;
  esac
done
$PYTHON scripts/two_gpus_summary.py "$OUT" 2>&1 | tee "$OUT/table.md"
echo "total $((SECONDS - START))s" | tee -a "$SUMMARY"
