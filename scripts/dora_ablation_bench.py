"""Where fast DoRA's step time goes beyond LoRA's, by ablation (issue 22: "DoRA within 10 % of LoRA").

Each row is a ``loralab bench`` row (``bench.runner.run_one``: the same model build, FP8 quantisation,
peft wrap, ``loralab run``'s step with its defaults, compile and CUDA graphs, timing) of the
``llama-3-8b/fixed`` workload (Llama-3-8B shape, random bf16 weights, r32 all-linear, 4 x 512 tokens),
all at one micro-batch (``--micro-batch``, default 4: one forward per optimizer step) so that the rows
differ only in what the variant changes:

  lora            LoRA
  dora            fast DoRA as shipped (norm refreshed once per step, magnitude trained)
  dora-frozen-m   fast DoRA with every magnitude vector frozen (``requires_grad`` off): no magnitude
                  gradient, so no token reduction of ``grad * out`` per layer, and the combine's
                  backward only scales the gradient. Its gap to ``dora`` is what the magnitude's
                  gradient costs; its gap to ``lora`` is the rest (the norm refresh, the combine's scaling
                  forward and backward, the saved output).
  dora-norm-once  fast DoRA whose step never refreshes the norm after the step is built (``run.step``'s
                  ``refresh_dora_norms`` patched to do nothing after its first call; the norms go stale as A
                  and B train): its gap to ``dora`` is what the once-per-step refresh costs inside the step
                  (compiled and, on CUDA, graphed as the step runs it).

each on the float base (bf16 on a GPU; the bench runs float32 on CPU) and on the FP8 base (``--bases``). After the ``dora`` row on each base the script also
times ``speed.fast_dora.refresh_dora_norms`` alone on that row's model (eager, CUDA events, median of 10):
the refresh's share of the step. Not a unit of speed that a user sees (a user's DoRA trains its magnitude):
a diagnostic, whose rows say which part to work on.

    python scripts/dora_ablation_bench.py --output $OUT/doraabl.json          # on a GPU, ~5-6 min
    python scripts/dora_ablation_bench.py --device cpu --preset tiny          # the tiny preset, on CPU

Prints a table (ms per step, tokens/s, peak) and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from loralab.bench import runner
from loralab.bench.workloads import FP8, presets
from loralab.run import step as run_step
from loralab.speed.fast_dora import refresh_dora_norms

VARIANTS = ("lora", "dora", "dora-frozen-m", "dora-norm-once")


def _freeze_magnitudes(model) -> int:
    """Every DoRA magnitude vector's ``requires_grad`` off; returns how many."""
    frozen = 0
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name and param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def _refresh_ms(model, device: str, backend=None, repeats: int = 10) -> float:
    """Median milliseconds of one ``refresh_dora_norms(model, backend)`` (not graphed), after one untimed call."""
    refresh_dora_norms(model, backend)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            refresh_dora_norms(model, backend)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            refresh_dora_norms(model, backend)
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def run(args) -> list[dict]:
    workload = next(w for w in presets(args.preset) if args.only in w.name)
    original_wrap, original_refresh = runner.wrap, run_step.refresh_dora_norms
    rows, profiles = [], []
    for base in args.bases:
        for variant in args.variants:
            built = {}

            def wrap(model, w, method, _variant=variant):
                wrapped = original_wrap(model, w, method)
                if _variant == "dora-frozen-m":
                    built["frozen"] = _freeze_magnitudes(wrapped)
                built["model"] = wrapped
                return wrapped

            method = ("dora" if variant.startswith("dora") else "lora")
            method = FP8 + method if base == "fp8" else method
            runner.wrap = wrap
            calls = []

            def refresh_once(model, backend=None):
                calls.append(1)
                return original_refresh(model, backend) if len(calls) == 1 else 0

            if variant == "dora-norm-once":
                run_step.refresh_dora_norms = refresh_once
            try:
                row = runner.run_one(workload, method, "loralab", args.device, args.steps, args.warmup,
                                     speed={"micro_batch": args.micro_batch},
                                     profile_to=profiles if variant in args.profile else None)
            finally:
                runner.wrap = original_wrap
                run_step.refresh_dora_norms = original_refresh
            if variant == "dora-norm-once":
                row["refresh_calls"] = len(calls)
            row.update(variant=variant, base=base, frozen_magnitudes=built.get("frozen", 0))
            if variant == "dora":
                row["refresh_ms"] = round(_refresh_ms(built["model"], args.device), 3)
                row["refresh_compiled_ms"] = round(_refresh_ms(built["model"], args.device, "inductor"), 3)
            built.clear()
            rows.append(row)
            print(f"{base:5s} {variant:14s} {row['step_ms']:8.1f} ms/step {row['throughput']:9,.0f} tokens/s "
                  f"peak {row['peak_memory_gib']} GiB  refresh {row.get('refresh_ms', '-')} ms eager, "
                  f"{row.get('refresh_compiled_ms', '-')} ms compiled", flush=True)
            if args.output:
                with open(args.output, "w") as f:
                    json.dump(rows, f, indent=1)
                if profiles:
                    with open(args.output.removesuffix(".json") + ".profile.txt", "w") as f:
                        f.write("\n\n".join(profiles))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: each row's step, its gap to LoRA's on the same base, and the refresh's ms."""
    lines = ["| base | variant | dtype | ms/step | tokens/s | peak GiB | ms over LoRA | refresh ms, eager | compiled |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lora = next((x for x in rows if x["base"] == r["base"] and x["variant"] == "lora"), None)
        gap = "" if lora is None else f"{r['step_ms'] - lora['step_ms']:+.1f}"
        peak = "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        lines.append(f"| {r['base']} | {r['variant']} | {r['dtype']} | {r['step_ms']:.1f} | {r['throughput']:,.0f} | {peak} | "
                     f"{gap} | {r.get('refresh_ms', '')} | {r.get('refresh_compiled_ms', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="full")
    p.add_argument("--only", default="llama-3-8b/fixed", help="the workload (a part of its name)")
    p.add_argument("--bases", nargs="+", default=["fp8", "bf16"], choices=["fp8", "bf16"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", nargs="*", default=[], choices=list(VARIANTS),
                   help="variants whose row also writes a torch.profiler table (<output>.profile.txt)")
    p.add_argument("--output")
    args = p.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # as run_bench: no cuDNN plan per new shape
    rows = run(args)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
