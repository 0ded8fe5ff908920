#!/usr/bin/env bash
# Issue 13's measurements on kind nvidia-h200-x2 (2 GPUs, NCCL), in parts; all four are meant to
# fit one 10-minute device call (a part can also run alone):
#   equal   `loralab run` of a MiniLM-L6 LoRA recipe on SST-2 (fp32, run's defaults; the carried
#           model with dropout set to 0, so neither launch draws anything at random) on 1 GPU and
#           under torchrun on 2 GPUs (NCCL): loss history, adapter and accuracy compared
#   (the 8B LoRA speed part moved to scripts/gpu_two_gpus.sh scaling: issue 23 measures it against the best
#           1-GPU path, CUDA graphs included)
#   fsdp    Llama-3-8B shape full fine-tuning (fp32 weights + AdamW: 128 GB of state, more than one
#           H200 holds) with FSDP2 over 2 GPUs: tokens/s and peak memory per GPU
#   corda   CorDA calibration covariances of MiniLM-L6 over 256 SST-2 sentences, 1 process vs 2
# Expects .devdata/minilm-l6 (fp16 safetensors + tokenizer) and .devdata/glue/SST-2 carried along,
# as scripts/gpu_speed.sh does. Results: $OUT/*.json, logs $OUT/*.log.
# Usage: bash scripts/gpu_distributed.sh equal fsdp corda
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export LORALAB_DATA_DIR=.devdata LORALAB_PACKAGED_DIR=.devdata
# git state: the tree travels without .git, so records say commit/branch/dirty "unknown" unless the
# launcher states what it measured on its side, e.g. LORALAB_GIT_COMMIT=$(git rev-parse HEAD)
# LORALAB_GIT_BRANCH=$(git rev-parse --abbrev-ref HEAD) LORALAB_GIT_DIRTY=$(git status --porcelain -uno | grep -q . && echo 1 || echo 0);
# each record names the variables it took ("source": "given by ..."). Nothing is assumed here.
# NVLink multicast stays off (KINDS.md): NCCL, PyTorch symmetric memory and NVSHMEM
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'gpus', torch.cuda.device_count())" | tee -a "$OUT/gpu.txt"
TORCHRUN="python -m torch.distributed.run --standalone --nproc_per_node=2"

equal_setup() {
  rm -rf /tmp/packaged /tmp/exp/dist && mkdir -p /tmp/packaged && cp -r .devdata/minilm-l6 /tmp/packaged/
  python - <<'EOF'
import json
from peft import LoraConfig
path = "/tmp/packaged/minilm-l6/config.json"
config = json.load(open(path))
config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
json.dump(config, open(path, "w"), indent=1)
d = "/tmp/exp/dist/minilm-sst2-lora"
LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear").save_pretrained(d)
json.dump({"task": "glue/sst2", "max_train_samples": 4096, "max_eval_samples": None, "batch_size": 32,
           "gradient_accumulation_steps": 2, "num_epochs": 1, "learning_rate": 5e-4, "logging_steps": 4,
           "dtype": "float32", "seed": 0}, open(f"{d}/training_parameters.json", "w"))
EOF
}

equal_compare() {
  python - <<'EOF'
import glob, json
from pathlib import Path
from safetensors.torch import load_file
recs = [json.loads(Path(glob.glob(f"/tmp/res-{n}/*/*.json")[0]).read_text()) for n in (1, 2)]
ads = [load_file(str(Path(r["train_info"]["adapter_path"]) / "adapter_model.safetensors")) for r in recs]
loss = [[m["train loss"] for m in r["train_info"]["metrics"] if "train loss" in m] for r in recs]
rel = max(float((ads[1][k] - v).norm() / v.norm().clamp_min(1e-12)) for k, v in ads[0].items())
print(json.dumps({"losses_1gpu": loss[0], "losses_2gpu": loss[1],
                  "max_loss_rel_diff": max(abs(a - b) / abs(a) for a, b in zip(*loss)),
                  "adapter_max_rel_l2": rel, "eval": [r["eval"] for r in recs],
                  "samples_per_s": [r["train_info"]["samples_per_second"] for r in recs],
                  "distributed": [r["train_info"]["distributed"] for r in recs]}, indent=1))
EOF
}

corda_compare() {
  python - <<'EOF'
import json, torch
a, b = torch.load("/tmp/corda_1.pt"), torch.load("/tmp/corda_2.pt")
assert a.keys() == b.keys()
rel = {k: float((b[k][0] - a[k][0]).norm() / a[k][0].norm()) for k in a}
eig = max(float(((torch.linalg.eigvalsh(b[k][0].double()) - torch.linalg.eigvalsh(a[k][0].double())).abs().max()
                 / torch.linalg.eigvalsh(a[k][0].double()).abs().max())) for k in a)
print(json.dumps({"groups": len(a), "samples": [a[next(iter(a))][1], b[next(iter(b))][1]],
                  "max_cov_rel_l2": max(rel.values()), "max_eigenvalue_rel_diff": eig}, indent=1))
EOF
}

for part in "$@"; do
  case $part in
    equal)
      equal_setup
      dir=/tmp/exp/dist/minilm-sst2-lora
      CUDA_VISIBLE_DEVICES=0 LORALAB_PACKAGED_DIR=/tmp/packaged LORALAB_RESULTS_DIR=/tmp/res-1 LORALAB_OUTPUT_DIR=/tmp/out-1 \
        python -m loralab run -v "$dir" 2>&1 | tee "$OUT/equal_1gpu.log"
      LORALAB_PACKAGED_DIR=/tmp/packaged LORALAB_RESULTS_DIR=/tmp/res-2 LORALAB_OUTPUT_DIR=/tmp/out-2 \
        $TORCHRUN -m loralab run -v "$dir" 2>&1 | tee "$OUT/equal_2gpu.log"
      equal_compare | tee "$OUT/equal.json" ;;
    fsdp)
      $TORCHRUN scripts/gpu_distributed.py fsdp --batch 16 --micro-batch 4 --warmup 1 --steps 3 2>&1 | tee "$OUT/fsdp_2gpu.log"
      grep -h '^{' "$OUT/fsdp_2gpu.log" > "$OUT/fsdp.json" ;;
    corda)
      CUDA_VISIBLE_DEVICES=0 python scripts/gpu_distributed.py corda --save /tmp/corda_1.pt 2>&1 | tee "$OUT/corda_1gpu.log"
      $TORCHRUN scripts/gpu_distributed.py corda --save /tmp/corda_2.pt 2>&1 | tee "$OUT/corda_2gpu.log"
      corda_compare | tee "$OUT/corda.json" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
