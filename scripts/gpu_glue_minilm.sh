#!/usr/bin/env bash
# Seed 000's GLUE recipe on MiniLM-L6 (RTE, MRPC, STS-B x Full FT, LoRA, DoRA, PiSSA, CorDA) on the GPU box.
# Expects .devdata/minilm-l6 (fp16 safetensors + tokenizer) and .devdata/glue/{RTE,MRPC,STS-B} carried along;
# Results land in $OUT/results/ (tarred on the way back).
set -euo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
export LORALAB_DATA_DIR=.devdata LORALAB_PACKAGED_DIR=.devdata
export LORALAB_RESULTS_DIR=$OUT LORALAB_OUTPUT_DIR=/tmp/loralab-outputs
# git state: the tree travels without .git, so records say commit/branch/dirty "unknown" unless the
# launcher states what it measured on its side, e.g. LORALAB_GIT_COMMIT=$(git rev-parse HEAD)
# LORALAB_GIT_BRANCH=$(git rev-parse --abbrev-ref HEAD) LORALAB_GIT_DIRTY=$(git status --porcelain -uno | grep -q . && echo 1 || echo 0);
# each record names the variables it took ("source": "given by ..."). Nothing is assumed here.
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpu.txt
dirs=()
for m in full lora dora pissa corda; do for t in rte mrpc stsb; do dirs+=(experiments/glue-minilm/$m/$t); done; done
time python -m loralab run "${dirs[@]}" 2>&1 | grep -v "it/s" | tee $OUT/run.log
cd $OUT && tar czf results.tar.gz results temporary_results 2>/dev/null || tar czf results.tar.gz results
