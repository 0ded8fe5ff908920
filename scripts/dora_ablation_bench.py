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
                  ``refresh_dora_norms`` patched to do nothing after its first call; the norms and the kept m / n
                  go stale as A, B and m train, so the magnitude's gradient, which divides by the live m, is not
                  DoRA's either): its gap to ``dora`` is what the once-per-step refresh costs inside the step
                  (compiled and, on CUDA, graphed as the step runs it).
  lora-probe-dynamic, dora-probe-dynamic
                  LoRA and DoRA with ``run.micro_batch.forget_probe_compiles`` patched to keep the probe's compiled
                  code: with ``--micro-batch auto`` (the probe) the step then captures its graphs from the
                  layers' dynamic-shape compile, as before that reset was added; the same as lora and dora
                  at an explicit micro-batch (no probe, nothing to forget).
  dora-per-group-gram
                  fast DoRA whose step refreshes its norms as at 10f2552 (``dora_refresh_forms.refresh_per_group``:
                  each layer group's Gram beside that group's products only), against the shipped refresh that
                  takes every group's Gram first, beside all the products
  dora-ratio-in-forward
                  fast DoRA whose refresh keeps the norms only (``keep_norms_only``), so every forward computes the
                  combine's scale m / n itself, as before the refresh kept it (one small kernel per layer-adapter)
  dora-triton-product
                  fast DoRA whose refresh takes every group's ``W·Aᵀ`` in one Triton kernel
                  (``speed.fp8_kernels.weights_times_triton``, inside ``dora_refresh_forms.form("triton-product")``) in place of one
                  ``_scaled_mm`` a layer (FP8 base only: a float base has no codes to read)
  dora-cublas-product
                  the same with one ``_scaled_mm`` a layer (``dora_refresh_forms.form("cublas-product")``): since
                  ``speed.fp8_refresh_kernel`` "auto" takes the Triton kernel on CUDA, the shipped product before it

each on the float base (``bf16``: bf16 on a GPU; the bench runs float32 on CPU, as the dtype column says) and
on the FP8 base (``--bases``). After the ``dora`` row on each base the script also times
``speed.dora_refresh.refresh_dora_norms`` alone on that row's model, outside any CUDA graph (median of 10, CUDA
events on a GPU), eager and with its elementwise tail compiled as the step compiles it. Not a unit of speed
that a user sees (a user's DoRA trains its magnitude and refreshes its norm): a diagnostic, whose rows say
which part to work on. The frozen variant also leaves the magnitudes out of AdamW and may change what the
compiled layers save; ``refresh_python_calls`` counts the Python calls of the patched refresh (a CUDA graph's
replay makes none), of which only the first computes.

    python scripts/dora_ablation_bench.py --output $OUT/doraabl.json          # on an H100, ~2 min (8 rows; timed in one window before 1ca45d8)
    python scripts/dora_ablation_bench.py --bases fp8 --variants lora dora --refresh-forms   # and the refresh's forms
    python scripts/dora_ablation_bench.py --device cpu --preset tiny --only tiny-llama/fixed --micro-batch 2
    python scripts/dora_ablation_bench.py --bases bf16 --variants lora dora --micro-batch auto --speed memory_fraction=0.441

Prints a table (ms per step, tokens/s, peak) and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
from dora_refresh_forms import FORMS, form, refresh_per_group, time_forms
from kernel_timing import median_ms

from loralab.bench import runner
from loralab.bench.workloads import FP8, presets
from loralab.commands.bench import parse_speed
from loralab.run import micro_batch as run_micro
from loralab.run import step as run_step
from loralab.speed import dora_refresh
from loralab.speed.dora_refresh import refresh_dora_norms

VARIANTS = ("lora", "dora", "dora-frozen-m", "dora-norm-once", "lora-probe-dynamic", "dora-probe-dynamic",
            "dora-per-group-gram", "dora-ratio-in-forward", "dora-triton-product", "dora-cublas-product")
FORM_OF = {"dora-triton-product": "triton-product",
           "dora-cublas-product": "cublas-product"}  # the variants that run the step's refresh in a refresh form


def keep_norms_only(members: list, norms: torch.Tensor) -> None:
    """``dora_refresh._keep_norms`` before the refresh kept m / n: the norms alone, in place where a layer has one."""
    kept, fresh = [], []
    for (module, name, _), norm in zip(members, norms.unbind(0), strict=True):
        holder = module.lora_magnitude_vector[name]
        old = getattr(holder, "_loralab_norm", None)
        if old is None or old.shape != norm.shape or old.device != norm.device:
            holder._loralab_norm = norm.clone()
        else:
            kept.append(old)
            fresh.append(norm)
    if kept:
        torch._foreach_copy_(kept, fresh)


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
    return median_ms(lambda: refresh_dora_norms(model, backend), repeats, warmup=1, device=device)


def _workload(preset: str, only: str):
    """The one workload of ``preset`` whose name contains ``only``; SystemExit naming the preset's workloads
    where none or several match."""
    workloads = presets(preset)
    kept = [w for w in workloads if only in w.name]
    if len(kept) != 1:
        raise SystemExit(f"--only {only!r} matches {len(kept)} workloads of the preset {preset!r} (one is needed); "
                         f"its workloads: {', '.join(w.name for w in workloads)}")
    return kept[0]


def run(args) -> list[dict]:
    workload = _workload(args.preset, args.only)
    print(f"workload {workload.name}, micro-batch {args.micro_batch}, {args.steps} timed steps x {args.windows} windows "
          f"after {args.warmup} warm-up, {args.device}", flush=True)
    original_wrap, original_refresh, original_forget = runner.wrap, run_step.refresh_dora_norms, run_micro.forget_probe_compiles
    original_keep = dora_refresh._keep_norms
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
            if variant == "dora-per-group-gram":
                run_step.refresh_dora_norms = refresh_per_group
            if variant == "dora-ratio-in-forward":
                dora_refresh._keep_norms = keep_norms_only
            if variant.endswith("-probe-dynamic"):
                run_micro.forget_probe_compiles = lambda: False
            product = form(FORM_OF[variant]) if variant in FORM_OF else contextlib.nullcontext()
            try:
                with product:  # the refresh form's product, put back after the row
                    row = runner.run_one(workload, method, "loralab", args.device, args.steps, args.warmup,
                                         speed={**args.speed, "micro_batch": args.micro_batch},
                                         profile_to=profiles if variant in args.profile else None, windows=args.windows)
            finally:
                runner.wrap = original_wrap
                run_step.refresh_dora_norms = original_refresh
                run_micro.forget_probe_compiles = original_forget
                dora_refresh._keep_norms = original_keep
            if variant == "dora-norm-once":
                row["refresh_python_calls"] = len(calls)
            row.update(variant=variant, base=base, frozen_magnitudes=built.get("frozen", 0))
            if variant in ("dora", "dora-probe-dynamic"):
                row["refresh_ms"] = round(_refresh_ms(built["model"], args.device), 3)
                row["refresh_compiled_ms"] = round(_refresh_ms(built["model"], args.device, "inductor"), 3)
                if args.refresh_forms:  # graphed and compiled on CUDA as the step runs it; eager on CPU
                    row["refresh_forms"] = time_forms(built["model"], args.device,
                                                      "inductor" if args.device == "cuda" else None, args.refresh_forms)
                    print(f"{base:5s} refresh forms: " + ", ".join(
                        f"{k} {v['ms']} ms (max rel diff {v['max_rel_diff']:.1e})" for k, v in row["refresh_forms"].items()),
                        flush=True)
            built.clear()
            rows.append(row)
            print(f"{base:5s} {variant:18s} mb {_micro_batch(row)} {row['step_ms']:8.1f} ms/step {row['throughput']:9,.0f} tokens/s "
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
    lines = ["| base | variant | dtype | micro-batch | ms/step | tokens/s | peak GiB | ms over LoRA | refresh ms, eager "
             "| compiled |", "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        twin = "lora-probe-dynamic" if r["variant"].endswith("-probe-dynamic") else "lora"  # its own kind of LoRA row
        lora = next((x for x in rows if x["base"] == r["base"] and x["variant"] == twin), None)
        gap = "" if lora is None else f"{r['step_ms'] - lora['step_ms']:+.1f}"
        peak = "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        lines.append(f"| {r['base']} | {r['variant']} | {r['dtype']} | {_micro_batch(r)} | {r['step_ms']:.1f} | {r['throughput']:,.0f} | {peak} | "
                     f"{gap} | {r.get('refresh_ms', '')} | {r.get('refresh_compiled_ms', '')} |")
    return "\n".join(lines)


def _micro_batch(row: dict) -> str:
    """The row's micro-batch as its step ran it, with the probe's sizes where it probed (e.g. "4 (probed 1, 2, 4)")."""
    speed = row.get("speed") or {}
    probe = speed.get("micro_batch_probe") or {}
    sizes = probe.get("sizes") or []
    return f"{speed.get('micro_batch')}" + (f" (probed {', '.join(map(str, sizes))})" if sizes else "")


def _micro_batch_arg(text: str) -> int | str:
    return text if text == "auto" else _positive(text)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be 1 or more")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (timed rows) or cpu (the tiny preset, a check)")
    p.add_argument("--preset", default="full", help="the bench preset (full, tiny)")
    p.add_argument("--only", default="llama-3-8b/fixed", help="the workload: a part of its name matching one")
    p.add_argument("--bases", nargs="+", default=["fp8", "bf16"], choices=["fp8", "bf16"],
                   help="fp8: the FP8 base; bf16: the workload's float base (float32 on CPU)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--micro-batch", type=_micro_batch_arg, default=4,
                   help="samples per forward, every row alike; auto: each row probes its own, as loralab run's default")
    p.add_argument("--steps", type=_positive, default=8, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=_positive, default=3, help="untimed steps before them")
    p.add_argument("--windows", type=_positive, default=3,
                   help="times each row's steps are timed back to back, the median window counting (an even count: the "
                        "slower middle one; loralab bench's full preset: 3)")
    p.add_argument("--profile", nargs="*", default=[], choices=list(VARIANTS),
                   help="variants whose row also writes a torch.profiler table (<output>.profile.txt), taken right "
                        "after the row's timing: rows timed after a profiled one may run slower (bench.runner.run_bench "
                        "profiles in a second pass for that reason)")
    p.add_argument("--refresh-forms", nargs="*", default=None, choices=list(FORMS),
                   help="after each dora row, time the norm refresh in these forms (none named: all), graphed as the "
                        "step runs it, each form's norms checked against the shipped form's (dora_refresh_forms.py); on "
                        "a float base only gram-split changes anything (W·Aᵀ is not read from FP8 codes there)")
    p.add_argument("--speed", action="append", default=[], metavar="KEY=VALUE",
                   help="a `loralab bench --speed` key for every row (e.g. memory_fraction=0.441: an H200's default "
                        "budget on an H100); the micro-batch is --micro-batch's")
    p.add_argument("--output")
    args = p.parse_args(argv)
    args.speed = parse_speed(args.speed)
    if "micro_batch" in args.speed:
        p.error(f"--speed micro_batch={args.speed['micro_batch']}: give the micro-batch as --micro-batch (a number or auto)")
    if args.refresh_forms == []:
        args.refresh_forms = list(FORMS)
    if args.profile and (args.device != "cuda" or not args.output):
        print("--profile: the profile is taken on CUDA only and written beside --output; none will be written",
              file=sys.stderr)
    rows = run(args)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
