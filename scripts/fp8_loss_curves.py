"""Issue 22, point 4 on the GPU: does an FP8 base train like bf16? Loss curves of the same LoRA run in
fp32, in bf16 and on an FP8 base, on real token data, side by side.

    python scripts/fp8_loss_curves.py [--shape llama-3-8b] [--layers N] [--steps 30] [--batch 16] [--output F.json]

One model shape (``loralab.shapes.MODELS``; random weights drawn once from seed 0, so every variant
starts from the same base), one LoRA r32 on every decoder linear layer (seed 0: the same A in every
variant), the same optimizer batches of real GSM8K training rows (question and answer, tokenized
with SmolLM2's tokenizer from ``packaged:smollm2-135m``, at most ``--length`` tokens), AdamW at
``--lr``, and the step ``loralab run`` builds (``run.step.make_step``, the run's defaults for the
device). The variants differ only in the base:
  fp32  base weights float32, no autocast;
  bf16  base weights bfloat16, bf16 autocast (``loralab run``'s default for a bf16 base);
  fp8   the bf16 base's linear layers in FP8 e4m3 (``methods/fp8base.quantize_linears``), bf16 autocast;
  fp8_weights  the bf16 base with each linear weight rounded to FP8 e4m3 and back (codes · scale, then
        bf16), computing in bf16 like bf16: the weight rounding alone, without FP8 activations and
        gradients; ``gap_fp8_weights_vs_bf16`` against ``gap_fp8_vs_bf16`` says how much of FP8's gap the
        weights' 3 mantissa bits make, which no FP8 base of this rule (per-channel e4m3) can avoid;
  bf16_rerun  bf16 once more, the same in every setting: how far two identical runs move apart on this
        device (nondeterministic kernels), the floor under every gap above (``gap_bf16_rerun``);
  fp8_exact  fp8 with ``speed.fp8_fast_accum: "none"`` (not in the default list; ``--variants``): every FP8 GEMM
        promotes its partial sums to float32, so ``gap_fp8_vs_fp8_exact`` is what the default's fast
        accumulation moves the curve.
``--variants`` runs a subset (in the order given); a gap or drift is reported where both its curves ran.
The criterion (issue 22): max_step |loss_fp8 - loss_bf16| is no larger than max_step
|loss_bf16 - loss_fp32|; also reported with each curve's first loss removed (``drift_*``: how the
runs move apart, without the offset each base's rounding adds before any step). Prints and writes
one JSON object: the five curves, the gaps and the drifts; while it runs, ``--output`` holds
``{"partial": true, "curves": ...}`` with the variants ended so far.
On CPU (``--device cpu``) it is a dry run of the script (autocast off there, so bf16 means bf16
weights computing in bf16).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
from gpu_distributed import llama_8b  # scripts/ is on sys.path: the same random-weight shape builder


def batches(n_steps: int, batch: int, length: int) -> list[list[dict]]:
    from loralab.models import load_tokenizer

    tok = load_tokenizer("packaged:smollm2-135m")
    path = os.path.join(os.environ.get("LORALAB_DATA_DIR", ".devdata"), "gsm8k", "train.jsonl")
    rows = []
    with open(path) as fh:
        for line in fh:
            item = json.loads(line)
            ids = tok(f"Question: {item['question']}\nAnswer: {item['answer']}")["input_ids"][:length]
            rows.append({"input_ids": ids, "labels": list(ids)})
            if len(rows) == n_steps * batch:
                break
    if len(rows) < n_steps * batch:
        raise SystemExit(f"{path}: {len(rows)} rows, {n_steps * batch} needed")
    return [rows[k * batch:(k + 1) * batch] for k in range(n_steps)]


VARIANTS = ("fp32", "bf16", "fp8", "fp8_weights", "bf16_rerun")
PAIRS = [("bf16", "fp32"), ("fp8", "bf16"), ("fp8", "fp32"), ("bf16_rerun", "bf16"), ("fp8_weights", "bf16"),
         ("fp8", "fp8_weights"), ("fp8", "fp8_exact"), ("fp8_exact", "bf16")]
"""The gaps reported, each where both curves ran."""
DRIFTS = [("bf16", "fp32"), ("fp8", "bf16"), ("bf16_rerun", "bf16"), ("fp8_weights", "bf16"), ("fp8", "fp8_exact"),
          ("fp8_exact", "bf16")]


def run_variant(variant: str, args, data, device, fixed: dict | None = None) -> dict:
    from peft import LoraConfig, get_peft_model

    from loralab.config import build_parameters
    from loralab.methods.common import linear_names
    from loralab.methods.fp8base import dequantize_linears, quantize_linears
    from loralab.methods.lora import ADAMW
    from loralab.run.step import make_step

    dtype = "float32" if variant == "fp32" else "bfloat16"  # every other variant: a bf16 model
    model = llama_8b(getattr(torch, dtype), device, args.shape, args.layers)
    if variant == "fp8_weights":  # FP8's weight rounding, then back to a plain bf16 model
        quantize_linears(model, linear_names(model))
        dequantize_linears(model).to(torch.bfloat16)
    speed = dict(fixed or {})  # speed keys set rather than probed (the rerun's: the first bf16 run's choices)
    if variant in ("fp8", "fp8_exact"):
        quantize_linears(model, linear_names(model))
        speed.update(fast_dora=False, fused_lora=False, **({"fp8_fast_accum": "none"} if variant == "fp8_exact" else {}))
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=targets))
    optimizer = ADAMW.make(model, None, build_parameters({"learning_rate": args.lr, "weight_decay": 0.0}))
    step, resolved = make_step(model, optimizer, speed=speed, kind="causal_lm", dtype=dtype, device=device,
                               features=[f for b in data for f in b], batch_size=args.batch, limit=args.batch,
                               max_length=args.length, pad_id=0, max_grad_norm=1.0, log=lambda line: None)
    t0 = time.perf_counter()
    losses = [float(step(b).loss) for b in data]
    seconds = time.perf_counter() - t0
    out = {"losses": losses, "seconds": seconds, "speed": resolved.record()}
    del model, optimizer, step
    gc.collect()
    if device.type == "cuda":
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--layers", type=int, help="decoder layers (a cut shape for a CPU dry run)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="samples per optimizer step")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=(*VARIANTS, "fp8_exact"),
                        help="a subset, in order (bf16_rerun needs bf16 before it)")
    parser.add_argument("--output")
    args = parser.parse_args()
    if "bf16_rerun" in args.variants and ("bf16" not in args.variants
                                          or args.variants.index("bf16") > args.variants.index("bf16_rerun")):
        parser.error("--variants: bf16_rerun repeats bf16 at its micro-batch, so bf16 must come before it")
    device = torch.device(args.device)
    data = batches(args.steps, args.batch, args.length)
    curves = {}
    for variant in args.variants:
        # the rerun at the first bf16 run's micro-batch and loss chunk (an explicit micro-batch skips the probe, which
        # also picks the chunk), so only nondeterminism can move it
        first = curves["bf16"]["speed"] if variant == "bf16_rerun" else {}
        fixed = {k: first[k] for k in ("micro_batch", "loss_chunk_size") if first.get(k) is not None}
        curves[variant] = run_variant(variant, args, data, device, fixed)
        print(f"{variant}: {len(curves[variant]['losses'])} steps in {curves[variant]['seconds']:.0f} s, last loss "
              f"{curves[variant]['losses'][-1]:.4f}", flush=True)
        if args.output:  # the curves so far, kept if a deadline stops the script before the last variant
            with open(args.output, "w") as fh:
                json.dump({"partial": True, "curves": curves}, fh, indent=1)
    loss = {v: c["losses"] for v, c in curves.items()}
    pairs = [(a, b) for a, b in PAIRS if a in loss and b in loss]
    gap = lambda a, b: max(abs(x - y) for x, y in zip(loss[a], loss[b]))  # noqa: E731
    # the same after removing each curve's first loss: how differently the runs *move*, apart from the
    # offset a base's rounding adds before any step (FP8's 3 mantissa bits against bf16's 7)
    drift = lambda a, b: max(abs((x - loss[a][0]) - (y - loss[b][0])) for x, y in zip(loss[a], loss[b]))  # noqa: E731
    result = {"shape": args.shape, "layers": args.layers, "steps": args.steps, "batch": args.batch, "length": args.length,
              "lr": args.lr, "device": args.device,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "tokens": sum(len(f["input_ids"]) for b in data for f in b), "curves": curves}
    for a, b in pairs:
        result[f"gap_{a}_vs_{b}"] = gap(a, b)
    for a, b in [p for p in DRIFTS if p in pairs]:
        result[f"drift_{a}_vs_{b}"] = drift(a, b)
    if "bf16_rerun" in loss:  # the names older files carry
        result["gap_bf16_rerun"], result["drift_bf16_rerun"] = result.pop("gap_bf16_rerun_vs_bf16"), result.pop(
            "drift_bf16_rerun_vs_bf16")
    if {"fp32", "bf16", "fp8"} <= set(loss):
        result["fp8_within_bf16_gap"] = result["gap_fp8_vs_bf16"] <= result["gap_bf16_vs_fp32"]
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
