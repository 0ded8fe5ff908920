"""Where the tuned peer's time goes (issue 22): one forward+backward of transformers + peft LoRA at the
Llama-3-8B shape (random bf16 weights, r32 all-linear) per variant and micro-batch, then a profile.

The bench's tuned peer (bf16 autocast + Liger) probed ~1,800 tokens/s at micro-batch 1 x 512 on an H100
and ~3,500 at 2 x 512 (``results/bench-fair-h100/fair8b.json``): nearly the same time per forward at
either size, as if a fixed cost dominated. This script times the variants (plain, autocast, Liger,
autocast + Liger) at 1 x 512 and 4 x 512 on one model and prints torch.profiler's top kernels and CPU
ops for the variant named by ``--profile``. CUDA only. Usage (device):
    PYTHONPATH=src python3 scripts/peer_diag.py --output $OUT/peerdiag.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from loralab.bench.peers import liger_available, liger_options, liger_patched, wrap
from loralab.bench.workloads import build_model, presets


def fwd_bwd(model, batch, autocast: bool) -> None:
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        loss = model(**batch).loss
    loss.backward()


def timed(model, batch, autocast: bool, reps: int = 3) -> float:
    """Milliseconds per forward+backward, after one untimed pass; gradients dropped."""
    fwd_bwd(model, batch, autocast)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fwd_bwd(model, batch, autocast)
    torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - start) / reps
    model.zero_grad(set_to_none=True)
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--profile", default="autocast+liger")
    args = parser.parse_args()
    w = next(w for w in presets("full") if w.name == "llama-3-8b/fixed-4x512")
    base = build_model(w, "cuda", torch.bfloat16)
    model = wrap(base, w, "lora")
    model.train()
    gen = torch.Generator().manual_seed(1)
    batches = {}
    for m in (1, 4):
        ids = torch.randint(3, 128000, (m, w.seq_len), generator=gen).cuda()
        batches[m] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    results = []
    variants = [("plain", False, False), ("autocast", True, False)]
    if liger_available(w, "cuda"):
        variants += [("liger", False, True), ("autocast+liger", True, True)]
    stack = contextlib.ExitStack()
    patched = False
    profile_text = None
    for name, autocast, liger in variants:
        if liger and not patched:  # Liger patches the instance for good: the Liger variants run last
            stack.enter_context(liger_patched(base, **liger_options(model)))
            patched = True
        for m, batch in batches.items():
            ms = timed(model, batch, autocast)
            row = {"variant": name, "micro_batch": m, "tokens": m * w.seq_len, "ms": round(ms, 1),
                   "tokens_per_s": round(m * w.seq_len / ms * 1000, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
        if name == args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fwd_bwd(model, batches[1], autocast)
                torch.cuda.synchronize()
            model.zero_grad(set_to_none=True)
            profile_text = (prof.key_averages().table(sort_by="cuda_time_total", row_limit=30) + "\n\n"
                            + prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
            print(profile_text, flush=True)
    stack.close()
    with open(args.output, "w") as f:
        json.dump({"rows": results, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}, f, indent=1)
    if profile_text:
        with open(args.output.replace(".json", ".profile.txt"), "w") as f:
            f.write(profile_text)


if __name__ == "__main__":
    main()
