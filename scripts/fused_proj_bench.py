"""Sibling projections as one GEMM, timed alone on CUDA (issue 22): whether q/k/v and gate/up, which read one
input, pay when their frozen base weights are one concatenated matrix, on a bf16 and on an FP8 base.

peft and transformers run Llama's q, k and v (and gate and up) as separate linear layers: at Llama-3-8B's shape
and 2,048 tokens, q is a 2048 x 4096 x 4096 GEMM and k, v are 2048 x 1024 x 4096 each, and in the backward the
three input gradients are three GEMMs whose results autograd adds. Fused (as gpt-fast and vLLM store ``wqkv``),
the forward is one 2048 x 6144 x 4096 GEMM and the input gradient one GEMM over K = 6144 with no adds. This
times, per group and base, at the 8B shapes (``SHAPES``):

  forward    separate: one GEMM per member (FP8: x quantised once, as the compiled step shares it);
             fused: one GEMM against the concatenated weight
  backward   separate: dx = sum of the members' ``g_i · W_i`` (FP8: each g_i scaled by its weight's channel
             scales and quantised per row, then ``_scaled_mm`` against the column-major codes);
             fused: one ``g_cat · W_cat`` (FP8: g_cat quantised once), ``g_cat`` given contiguous; ``+cat``
             adds the copy that makes it from the members' gradients where nothing writes them in place

Each sample is 10 calls back to back (kernel_timing.median_ms over them), so launches overlap as in a CUDA
graph. Prints a table of microseconds per call and the fused/separate ratio; ``--output`` writes JSON.

    python scripts/fused_proj_bench.py --output $OUT/fusedproj.json     # on a GPU, ~20 s
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from kernel_timing import median_ms

from loralab.speed.fp8 import FP8, quantize_rows

SHAPES = {"qkv": (4096, (4096, 1024, 1024)), "gate_up": (4096, (14336, 14336))}
BACK_TO_BACK = 10


def _fp8_weight(w: torch.Tensor):
    codes, scales = quantize_rows(w)
    return codes, scales.view(-1), codes.t().contiguous().t()  # (N, K), (N,), column-major (N, K) for dx


def _mm(a, b, sa, sb):
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True)


def cases(tokens: int, device: str):
    """(group, base, form, fn) for every timed call at ``tokens`` rows."""
    quant = torch.compile(quantize_rows)
    scaled_quant = torch.compile(lambda g, s: quantize_rows(g.float() * s.view(1, -1)))
    for group, (k, outs) in SHAPES.items():
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k ** 0.5 for n in outs]
        gs = [torch.randn(tokens, n, device=device, dtype=torch.bfloat16) for n in outs]
        w_cat, g_cat = torch.cat(ws), torch.cat(gs, dim=1)
        yield group, "bf16", "forward separate", lambda: [F.linear(x, w) for w in ws]
        yield group, "bf16", "forward fused", lambda: F.linear(x, w_cat)
        yield group, "bf16", "backward separate", lambda: sum(g @ w for g, w in zip(gs, ws))
        yield group, "bf16", "backward fused", lambda: g_cat @ w_cat
        yield group, "bf16", "backward fused +cat", lambda: torch.cat(gs, dim=1) @ w_cat
        parts = [_fp8_weight(w) for w in ws]
        codes_cat, scales_cat, colmajor_cat = _fp8_weight(w_cat)
        ones = torch.ones(1, k, device=device)

        def fwd_sep():
            xq, sx = quant(x)
            return [_mm(xq, c.t(), sx, s.view(1, -1)) for c, s, _ in parts]

        def fwd_fused():
            xq, sx = quant(x)
            return _mm(xq, codes_cat.t(), sx, scales_cat.view(1, -1))

        def bwd_sep():
            out = None
            for g, (_, s, cm) in zip(gs, parts):
                gq, sg = scaled_quant(g, s)
                dx = _mm(gq, cm, sg, ones)
                out = dx if out is None else out + dx
            return out

        def bwd_fused(cat=False):
            gq, sg = scaled_quant(torch.cat(gs, dim=1) if cat else g_cat, scales_cat)
            return _mm(gq, colmajor_cat, sg, ones)

        yield group, "fp8", "forward separate", fwd_sep
        yield group, "fp8", "forward fused", fwd_fused
        yield group, "fp8", "backward separate", bwd_sep
        yield group, "fp8", "backward fused", bwd_fused
        yield group, "fp8", "backward fused +cat", lambda: bwd_fused(cat=True)


def agreement(tokens: int, device: str, shapes=None) -> dict:
    """Max relative difference, per (group, base, direction), between the fused form's result and the separate
    forms' (forward: the separate outputs side by side; backward: their sum): the forms time the same product."""
    global SHAPES
    saved, SHAPES = SHAPES, shapes or SHAPES
    try:
        results = {}
        for group, base, form, fn in cases(tokens, device):
            if base == "fp8" and device == "cpu" and "backward" in form:
                continue  # fast accumulation on a column-major operand: CUDA's kernel only
            out = fn()
            results[(group, base, form)] = torch.cat(out, dim=1) if isinstance(out, list) else out
    finally:
        SHAPES = saved
    diffs = {}
    for (group, base, form), out in results.items():
        direction = form.split()[0]
        sep = results[(group, base, f"{direction} separate")].float()
        diffs[(group, base, form)] = float((out.float() - sep).abs().max() / sep.abs().max())
    return diffs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    rows = []
    for group, base, form, fn in cases(args.tokens, args.device):
        if base == "fp8" and args.device == "cpu":
            continue  # CPU's reference _scaled_mm is not what is being measured
        ms = median_ms(lambda: [fn() for _ in range(BACK_TO_BACK)], args.iters, warmup=2, device=args.device)
        rows.append({"group": group, "base": base, "form": form, "us": round(1000 * ms / BACK_TO_BACK, 2)})
    by = {(r["group"], r["base"], r["form"]): r["us"] for r in rows}
    print(f"{args.tokens} tokens, {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    print("| group | base | form | us | fused / separate |\n|---|---|---|--:|--:|")
    for r in rows:
        direction = r["form"].split()[0]
        sep = by.get((r["group"], r["base"], f"{direction} separate"))
        ratio = "" if "separate" in r["form"] or not sep else f"{r['us'] / sep:.3f}"
        print(f"| {r['group']} | {r['base']} | {r['form']} | {r['us']:.1f} | {ratio} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"tokens": args.tokens, "device": args.device, "fp8_dtype": str(FP8), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
