"""Engine probe on one GPU (development measurement, not the bench): agreement with transformers'
greedy generate on a random Llama-3-8B-shape model with a LoRA r32 adapter (bf16), then the
engine's throughput on GSM8K prompts at a fixed budget, with the engine's counters.

PYTHONPATH=src LORALAB_DATA_DIR=.devdata LORALAB_PACKAGED_DIR=.devdata python scripts/gpu_engine_probe.py OUT_DIR
"""

import json
import os
import sys
import time

import torch

from loralab.engine import Engine
from loralab.models import load_model, load_tokenizer
from loralab.tasks import evaluations as evals

out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
budget = int(os.environ.get("BUDGET", 256))
n_prompts = int(os.environ.get("PROMPTS", 1319))
slots_list = [int(s) for s in os.environ.get("SLOTS", "256").split(",")]
report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "budget": budget, "git": None,
          "git_note": "no .git on the GPU copy of the tree"}

t0 = time.perf_counter()
model = load_model("random:llama-3-8b", "causal_lm", dtype="bfloat16").cuda()
tokenizer = load_tokenizer("random:llama-3-8b")
from peft import LoraConfig, get_peft_model  # noqa: E402

model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", init_lora_weights=False))
model.eval()
report["load_s"] = time.perf_counter() - t0
problems = evals.EVALS["gsm8k"].load("gsm8k", os.environ["LORALAB_DATA_DIR"], n_prompts)
prompts = [evals.EVALS["gsm8k"].build_prompt("gsm8k", p, {"prompt": "corda"}) for p in problems]
ids = [tokenizer(p)["input_ids"] for p in prompts]
print(f"loaded in {report['load_s']:.1f}s; {len(ids)} prompts, mean {sum(map(len, ids)) / len(ids):.0f} tokens", flush=True)

# 1. agreement with transformers greedy (bf16: kernels differ, so near-ties may flip)
k = 8
tokenizer.padding_side = "left"
pad = tokenizer.pad({"input_ids": ids[:k]}, return_tensors="pt").to("cuda")
with torch.no_grad():
    ref = model.generate(**pad, max_new_tokens=32, do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=None)[:, pad["input_ids"].shape[1]:].tolist()
engine = Engine(model, max_slots=4)
mine = engine.generate(ids[:k], [32] * k)
agree = [next((j for j, (a, b) in enumerate(zip(r, m[0])) if a != b), 32) for r, m in zip(ref, mine)]
report["agreement_first_diff"] = agree
print("first differing token per prompt (32 = identical):", agree, flush=True)

# 2. throughput
unmerged = Engine(model, max_slots=4, merge=False).generate(ids[:k], [32] * k)
agree_merge = [next((j for j, (a, b) in enumerate(zip(r[0], m[0])) if a != b), 32) for r, m in zip(unmerged, mine)]
report["merged_vs_unmerged_first_diff"] = agree_merge
print("merged vs unmerged engine, first differing token (32 = identical):", agree_merge, flush=True)
for slots, merge in [(s, m) for s in slots_list for m in (True, False) if m or s == slots_list[-1]]:
    engine = Engine(model, max_slots=slots, merge=merge)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    outs = engine.generate(ids, [budget] * len(ids))
    torch.cuda.synchronize()
    sec = time.perf_counter() - t
    new = sum(len(o[0]) for o in outs)
    row = {"slots": slots, "merge": merge, "seconds": sec, "new_tokens": new, "tokens_per_s": new / sec,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, **engine.stats}
    report.setdefault("throughput", []).append(row)
    print(json.dumps(row), flush=True)
    # time of the graph replays alone (GPU bound of the loop) for the steady-state key
    if engine.cuda_graphs:
        engine2 = Engine(model, max_slots=slots)
        engine2.generate(ids[:slots], [8] * min(slots, len(ids)))

with open(os.path.join(out_dir, "engine_probe.json"), "w") as fh:
    json.dump(report, fh, indent=1)

# 3. where a decode step's time goes (steady state: all slots, keys bucket 384)
if os.environ.get("PROFILE", "1") == "1":
    from loralab.engine.cache import SlotCache

    slots, length = slots_list[0], 384
    engine = Engine(model, max_slots=slots)
    r = engine.runner
    engine._cache = SlotCache.allocate(layers=len(r.layers), slots=slots, kv_heads=r.kv_heads, max_len=512,
                                       head_dim=r.head_dim, dtype=r.dtype, device=r.device)
    engine._graphs = {}
    engine._tokens = torch.randint(100, 40000, (slots,), device="cuda")
    engine._positions = torch.randint(100, 380, (slots,), device="cuda")
    with torch.no_grad():
        engine._decode(slots, length)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            engine._decode(slots, length)
        torch.cuda.synchronize()
        graph_ms = (time.perf_counter() - t) / 20 * 1e3
        for _ in range(3):
            engine._decode_eager(slots, length)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            engine._decode_eager(slots, length)
        torch.cuda.synchronize()
        eager_ms = (time.perf_counter() - t) / 5 * 1e3
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine._decode_eager(slots, length)
            torch.cuda.synchronize()
    print(f"decode step at {slots} slots, {length} keys: graph {graph_ms:.2f} ms, eager {eager_ms:.2f} ms", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30), flush=True)
    report["step_ms"] = {"graph": graph_ms, "eager": eager_ms, "slots": slots, "keys": length}
    with open(os.path.join(out_dir, "engine_probe.json"), "w") as fh:
        json.dump(report, fh, indent=1)
