#!/usr/bin/env bash
# Issue 6's measurements on the GPU box, in parts (each well inside one 10-minute device call):
#   tests      CUDA-graph and fast-DoRA tests on the GPU (tests/test_graphs.py, tests/test_fast_dora.py)
#   roberta    loralab bench, roberta-base SST-2 rows, with and without torch.compile
#   run        loralab run: MiniLM-L6 LoRA on all of SST-2 (one epoch), CUDA graphs on vs off
#   llama8b    loralab bench, Llama-3-8B rows (fixed 4x512 and GSM8K lengths, LoRA and DoRA)
# Expects .devdata/minilm-l6 (fp16 safetensors + tokenizer) and .devdata/glue/SST-2 carried along.
# Usage: bash scripts/gpu_speed.sh tests roberta run     (files land in $OUT)
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export LORALAB_DATA_DIR=.devdata LORALAB_PACKAGED_DIR=.devdata
# git state: the tree travels without .git, so records say commit/branch/dirty "unknown" unless the
# launcher states what it measured on its side, e.g. LORALAB_GIT_COMMIT=$(git rev-parse HEAD)
# LORALAB_GIT_BRANCH=$(git rev-parse --abbrev-ref HEAD) LORALAB_GIT_DIRTY=$(git status --porcelain -uno | grep -q . && echo 1 || echo 0);
# each record names the variables it took ("source": "given by ..."). Nothing is assumed here.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

for part in "$@"; do
  case $part in
    tests)
      python -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_fast_dora.py 2>&1 | tee "$OUT/tests.log" ;;
    roberta)
      python -m loralab bench --preset full --device cuda --only roberta --profile --output "$OUT/bench_roberta.json" 2>&1 | tee "$OUT/bench_roberta.log"
      python -m loralab bench --preset full --device cuda --only roberta --no-compile --output "$OUT/bench_roberta_nocompile.json" 2>&1 | tee -a "$OUT/bench_roberta.log" ;;
    run)
      for graphs in true false; do
        dir=/tmp/exp/graphs-$graphs/lora-minilm-sst2
        mkdir -p "$dir" && cp experiments/quickstart/lora-minilm-sst2/adapter_config.json "$dir/"
        echo "{\"task\": \"glue/sst2\", \"max_train_samples\": null, \"num_epochs\": 1, \"learning_rate\": 5e-4,
               \"logging_steps\": 100, \"speed\": {\"cuda_graphs\": $graphs}}" > "$dir/training_parameters.json"
        LORALAB_RESULTS_DIR=/tmp/res-$graphs LORALAB_OUTPUT_DIR=/tmp/outputs python -m loralab run "$dir" 2>&1 | tee -a "$OUT/run.log"
        cp "$(find /tmp/res-$graphs -name '*.json' | head -1)" "$OUT/run_sst2_graphs_$graphs.json"
      done ;;
    llama8b)
      python -m loralab bench --preset full --device cuda --only llama-3-8b --profile --output "$OUT/bench_8b.json" 2>&1 | tee "$OUT/bench_8b.log" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
