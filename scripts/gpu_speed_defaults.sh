#!/usr/bin/env bash
# Issue 10's goals on one GPU (H200/H100): loralab run's speed defaults, measured.
#
#   a   the shipped experiments/llm/seed000-llama3-8b-math/lora recipe at Llama-3-8B shape with
#       random weights (SmolLM2's tokenizer, GSM8K train standing in for MetaMathQA, which is not on
#       disk): `loralab bench --experiment ... --random-weights --task gsm8k --steps 5`, i.e.
#       `loralab run`'s own path vs transformers Trainer + peft, 5 optimizer steps = 640 samples each.
#       5, not 3: with packing, steps 2-4 of this recipe each meet a new micro-batch shape (so a CUDA
#       graph capture, counted as warm-up by loralab run); step 5 is the first steady one (shapes
#       simulated on CPU with Step.plan; see results/bench/README.md). ~5 min (Trainer: ~35 s a step).
#   b   `loralab bench --preset full --only llama-3-8b/fixed` (LoRA and DoRA, 4 x 512), the loralab
#       stack on loralab run's defaults. ~3 min.
#   c   defaults vs eager on a short real recipe: SmolLM2-135M-Instruct (the packaged GGUF), GSM8K,
#       LoRA r16 on every linear layer, 4 x 4 samples a step, 30 steps, three runs through
#       loralab.run.run_experiment: `defaults` (bf16 base, no speed keys), `eager-bf16` (bf16 base,
#       bf16 autocast; no graphs, compile or packing: bf16 rounding alone) and `eager-fp32`
#       (float32 base, {"cuda_graphs": false, "compile": false, "autocast": null, "packing": false}).
#       Reports the max relative per-step loss difference of each against eager-fp32. ~2 min.
#
# The SmolLM2 GGUF is 98 MB, over one call's 64 MiB, so it travels in two halves over two calls to
# the same warm machine (an ignored path a call does not carry stays there):
#   here, once:   bash scripts/gpu_speed_defaults.sh prepare     (builds .devdata/ and .whl/, ignored)
#   device call 1 (carry .devdata/gsm8k .devdata/smollm2-135m .devdata/smollm2-gguf-a):
#                 bash scripts/gpu_speed_defaults.sh a
#   device call 2, right after (carry .devdata/gsm8k .devdata/smollm2-135m .devdata/smollm2-gguf-b .whl):
#                 bash scripts/gpu_speed_defaults.sh b c
# If the machine went back between the calls, part c says so and stops; a and b need no model file.
# The tree travels without .git: see the git-state note below.
# Files land in $OUT (one JSON and one log per part); the tables are printed last.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

prepare() {  # on the development machine: data, tokenizer folder, GGUF halves, gguf wheel
  set -e
  local data=${LORALAB_DATA_DIR:-../shared/data}
  mkdir -p .devdata/gsm8k
  cp "$data/gsm8k/train.jsonl" .devdata/gsm8k/
  bash scripts/prepare_smollm2_devdata.sh
  du -sh .devdata/* .whl
}

if [ "${1:-}" = prepare ]; then prepare; exit; fi

export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export LORALAB_DATA_DIR=.devdata LORALAB_PACKAGED_DIR=.devdata LORALAB_CACHE=${LORALAB_CACHE:-/tmp/loralab-cache}
# git state: the tree travels without .git, so records say commit/branch/dirty "unknown" unless the
# launcher states what it measured on its side, e.g. LORALAB_GIT_COMMIT=$(git rev-parse HEAD)
# LORALAB_GIT_BRANCH=$(git rev-parse --abbrev-ref HEAD) LORALAB_GIT_DIRTY=$(git status --porcelain -uno | grep -q . && echo 1 || echo 0);
# each record names the variables it took ("source": "given by ..."). Nothing is assumed here.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

part_a() {
  python3 -m loralab bench --experiment experiments/llm/seed000-llama3-8b-math/lora --random-weights --task gsm8k \
    --steps 5 --output "$OUT/a_seed000_8b.json" 2>&1 | tee "$OUT/a.log"
  python3 - "$OUT/a_seed000_8b.json" <<'EOF' 2>&1 | tee -a "$OUT/a.log"
import json, sys
r = json.load(open(sys.argv[1]))
rows = {x["stack"]: x for x in r["rows"]}
ours, peer = rows["loralab"], rows["trainer"]
n = lambda row, key: row.get(key) or 0
print(f"\n(a) goal: >= 10,000 real tokens/s, >= 15x the Trainer, <= 40 GiB. loralab {n(ours, 'tokens_per_second'):,.0f} tokens/s "
      f"over {ours.get('steady_steps')} steady step(s) (micro-batch {ours.get('micro_batch')}, warm-up {n(ours, 'warmup_seconds'):.1f} s), "
      f"Trainer {n(peer, 'tokens_per_second'):,.0f} over steps 2-{peer.get('steps')}, ratio {r['ratio'] or 0:.2f}x, "
      f"peak {ours.get('peak_memory_gib')} vs {peer.get('peak_memory_gib')} GiB; whole runs (warm-up included) "
      f"{n(ours, 'overall_tokens_per_second'):,.0f} vs {n(peer, 'overall_tokens_per_second'):,.0f} tokens/s")
for row in (ours, peer):
    print(f"step losses {row['stack']}:", [round(x, 4) for x in row.get("losses") or []], row.get("error") or "")
EOF
}

part_b() {
  python3 -m loralab bench --preset full --device cuda --only llama-3-8b/fixed --output "$OUT/b_bench_8b.json" \
    2>&1 | tee "$OUT/b.log"
  python3 - "$OUT/b_bench_8b.json" <<'EOF' 2>&1 | tee -a "$OUT/b.log"
import json, sys
rows = {(r["method"], r["stack"]): r for r in json.load(open(sys.argv[1]))}
get = lambda m, s: (rows.get((m, s)) or {}).get("throughput") or 0
lora, dora, peer = get("lora", "loralab"), get("dora", "loralab"), get("lora", "peer")
print(f"\n(b) goal: 8B LoRA 4x512 >= 2.2x transformers + peft: {lora / peer if peer else 0:.2f}x "
      f"({lora:,.0f} vs {peer:,.0f} tokens/s); DoRA within 10 % of LoRA: {100 * (1 - dora / lora) if lora else 0:.1f} % slower "
      f"(micro-batch {rows.get(('lora', 'loralab'), {}).get('micro_batch')}, speed {rows.get(('lora', 'loralab'), {}).get('speed')})")
EOF
}

part_c() {
  local model=/tmp/smollm2/$(cat .devdata/smollm2-gguf-b/NAME 2>/dev/null)
  if [ ! -f .devdata/smollm2-gguf-a/part ] || [ ! -f .devdata/smollm2-gguf-b/part ]; then
    echo "(c) skipped: both halves of the SmolLM2 GGUF must be on this machine (.devdata/smollm2-gguf-a/part from"
    echo "    call 1, .devdata/smollm2-gguf-b/part carried now); the machine went back between the calls? Run"
    echo "    'bash scripts/gpu_speed_defaults.sh a' (carrying gguf-a) again, then this call at once."
    return 1
  fi
  mkdir -p /tmp/smollm2 && cat .devdata/smollm2-gguf-a/part .devdata/smollm2-gguf-b/part > "$model"
  if [ "$(sha256sum "$model" | cut -d' ' -f1)" != "$(cat .devdata/smollm2-gguf-b/SHA256)" ]; then
    echo "(c) skipped: the reassembled GGUF's sha256 differs from the packaged file's"; return 1
  fi
  python3 - "$model" "$OUT/c_defaults_vs_eager.json" <<'EOF' 2>&1 | tee "$OUT/c.log"
import json, os, sys, tempfile
from pathlib import Path
import torch
from loralab.experiment import read_experiment
from loralab.run import run_experiment

model, out = sys.argv[1], sys.argv[2]
root = Path(tempfile.mkdtemp(prefix="speed-defaults-"))
os.environ.update(LORALAB_RESULTS_DIR=str(root / "results"), LORALAB_OUTPUT_DIR=str(root / "outputs"))
adapter = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "task_type": "CAUSAL_LM",
           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
recipe = {"model_id": model, "task": "gsm8k", "batch_size": 4, "gradient_accumulation_steps": 4, "max_length": 512,
          "learning_rate": 2e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.1, "weight_decay": 0.0, "max_grad_norm": 1.0,
          "max_steps": int(os.environ.get("C_STEPS", 30)), "logging_steps": 1, "checkpoint_steps": 0, "seed": 0, "eval_tasks": ["gsm8k"]}
eager = {"cuda_graphs": False, "compile": False, "packing": False}
runs = {"defaults": ("bfloat16", {}),
        "eager-bf16": ("bfloat16", {**eager, "autocast": "bfloat16"}),
        "eager-fp32": ("float32", {**eager, "autocast": None})}
result = {"model": model, "recipe": recipe, "adapter": adapter, "runs": {}}
for name, (dtype, speed) in runs.items():
    folder = root / "experiments" / "speed-defaults" / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(adapter))
    (folder / "training_parameters.json").write_text(json.dumps({**recipe, "dtype": dtype, "speed": speed}))
    torch._dynamo.reset()
    record, _ = run_experiment(read_experiment(folder), evaluate=False).unwrap()
    info = record["train_info"]
    losses = [m["train loss"] for m in info["metrics"] if "train loss" in m]
    result["runs"][name] = {"dtype": dtype, "speed": info["speed"], "losses": losses,
                            "tokens_per_second": info["tokens_per_second"], "warmup_time": info["warmup_time"],
                            "train_time": info["train_time"], "peak_memory_gib": info.get("cuda_memory_max", 0) / 2**30}
ref = result["runs"]["eager-fp32"]["losses"]
lines = ["| run | dtype | speed (resolved) | steady tokens/s | peak | max rel. loss diff vs eager-fp32 | mean | step-1 / step-30 loss |",
         "|---|---|---|--:|--:|--:|--:|--:|"]
for name, r in result["runs"].items():
    rel = [abs(a - b) / abs(b) for a, b in zip(r["losses"], ref)]
    r["max_rel_diff_vs_fp32"], r["mean_rel_diff_vs_fp32"] = max(rel), sum(rel) / len(rel)
    keys = {k: r["speed"][k] for k in ("cuda_graphs", "compile", "autocast", "packing", "micro_batch")}
    lines.append(f"| {name} | {r['dtype']} | {keys} | {r['tokens_per_second'] or 0:,.0f} | {r['peak_memory_gib']:.2f} GiB | "
                 f"{r['max_rel_diff_vs_fp32']:.2e} | {r['mean_rel_diff_vs_fp32']:.2e} | {r['losses'][0]:.4f} / {r['losses'][-1]:.4f} |")
Path(out).write_text(json.dumps(result, indent=1, default=str) + "\n")
print("\n(c) defaults vs eager, SmolLM2-135M-Instruct, GSM8K, 30 steps x 16 samples (per-step train loss):")
print("\n".join(lines))
d, b = result["runs"]["defaults"]["max_rel_diff_vs_fp32"], result["runs"]["eager-bf16"]["max_rel_diff_vs_fp32"]
print(f"(c) goal: defaults within bf16 noise of eager fp32: max rel. diff {d:.2e}, plain bf16's own {b:.2e} ({d / b:.2f}x)")
EOF
}

status=0
for part in "$@"; do
  case $part in
    a) part_a || status=1 ;;
    b) part_b || status=1 ;;
    c) part_c || status=1 ;;
    *) echo "unknown part $part (parts: prepare, a, b, c)"; exit 2 ;;
  esac
done
echo; echo "==== tables (paste into results/bench/README.md) ===="
for f in "$OUT"/a.log "$OUT"/b.log "$OUT"/c.log; do
  [ -f "$f" ] && { echo "-- $(basename "$f")"; grep -E '^\||^\(|^llm/|^step losses|^steady state|failed: ' "$f"; }
done
exit $status
