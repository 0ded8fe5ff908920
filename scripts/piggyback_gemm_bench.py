"""What fast DoRA's refresh product would cost carried on the forward's own FP8 GEMMs, timed alone on CUDA
(issue 22: FP8-base DoRA within 10 % of LoRA).

The once-a-step refresh (``speed/dora_refresh.py``) reads every layer's FP8 codes for ``W·Aᵀ``: 7 GB at the
Llama-3-8B shape, ~4 ms of a ~104 ms step graphed on an H100 (results/bench-tritonproduct-h100), the largest part
of DoRA's time beyond LoRA's that is not the magnitude's gradient. The forward's GEMM ``x·Wᵀ`` reads the same
codes. Stacking A's two FP8 terms (hi and lo, 2r rows with their own row scales: ``speed/fp8.weight_times``'s
split) under the activations' rows, ``[x; A_hi; A_lo]·Wᵀ`` gives the layer's output and ``(W·Aᵀ)ᵀ`` in one
GEMM, with no second read of the codes: the rows' extra cost is what this measures, per 8B projection shape and in
sum over a step's 32 decoder layers, against the refresh's time measured beside it by dora_ablation_bench.

  plain   ``_scaled_mm`` of ``tokens`` rows, row-wise scales, bf16 out, fast accumulation (the FP8 forward)
  +E      the same with E more rows (E = r or 2r, r = 32: A's terms), its output's first ``tokens`` rows compared
          bitwise with plain's (a kernel of another tiling may sum in another order)
  +E cat  also the copy that stacks the activations' codes on the terms (where the quantisation cannot write
          into the stacked buffer)

Summed over one forward two ways: q, k and v as separate GEMMs, and fused as the FP8 base runs them by default
(``speed.fp8_fused_qkv``), where the three layers' A's would need three times the rows (timed with E only). The
stacked terms' products come out in bf16, against the refresh kernel's float32 (a precision loss not measured).

Each sample is 10 calls back to back (kernel_timing.median_ms over them). Prints microseconds per call, the extra
per shape and the sum for one forward of the 8B model; ``--output`` writes JSON. Measurement only: nothing in
loralab takes this path.

    python scripts/piggyback_gemm_bench.py --output $OUT/piggyback.json     # on a GPU, ~15 s
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from kernel_timing import median_ms

from loralab.speed.fp8 import FP8, quantize_rows

# (name, out features N, in features K, GEMMs of that shape in one Llama-3-8B decoder layer: q, k, v apart; with the
# base's q/k/v fused as loralab's FP8 default runs them, ``speed.fp8_fused_qkv``)
SHAPES = (("q / o", 4096, 4096, 2, 1), ("k / v", 1024, 4096, 2, 0), ("qkv fused", 6144, 4096, 0, 1),
          ("gate / up", 14336, 4096, 2, 2), ("down", 4096, 14336, 1, 1))
LAYERS = 32
BACK_TO_BACK = 10


def _mm(a, b, sa, sb):
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True)


def stacked_product(xq, sx, tq, st, codes, sw):
    """``[x; t]·Wᵀ`` (T + E, N) bf16 from the activations' codes ``xq`` (T, K) and row scales ``sx`` (T, 1), the
    terms' codes ``tq`` (E, K) and scales ``st`` (E, 1), the weight's codes (N, K) and channel scales ``sw`` (1, N):
    its first T rows are the layer's output, the last E the terms' products with W (``(W·tᵀ)ᵀ``)."""
    return _mm(torch.cat([xq, tq]), codes.t(), torch.cat([sx, st]), sw)


def cases(tokens: int, extras, device: str):
    """(shape, form, extra rows, fn) for every timed call: fn() returns the GEMM's (tokens + extra rows, N) output."""
    for name, n, k, *_ in SHAPES:
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k ** 0.5
        codes, scales = quantize_rows(w)
        sw = scales.view(1, -1)
        xq, sx = quantize_rows(torch.randn(tokens, k, device=device, dtype=torch.bfloat16))
        yield name, "plain", 0, (lambda xq=xq, sx=sx, c=codes, sw=sw: _mm(xq, c.t(), sx, sw))
        for e in extras:
            tq, st = quantize_rows(torch.randn(e, k, device=device, dtype=torch.bfloat16) * 0.02)
            stacked, s_stacked = torch.cat([xq, tq]), torch.cat([sx, st])
            yield name, f"+{e}", e, (lambda a=stacked, s=s_stacked, c=codes, sw=sw: _mm(a, c.t(), s, sw))
            yield name, f"+{e} cat", e, (lambda xq=xq, tq=tq, sx=sx, st=st, c=codes, sw=sw:
                                         stacked_product(xq, sx, tq, st, c, sw))


def forward_sums(rows: list[dict]) -> dict:
    """{"separate q/k/v" | "fused q/k/v": {form: extra ms}}: each form's extra microseconds per GEMM (``rows``, as
    main writes them) summed over one forward of the 8B model's ``LAYERS`` decoder layers, in milliseconds."""
    sums = {}
    for layout, column in (("separate q/k/v", 3), ("fused q/k/v", 4)):
        per_layer = {shape[0]: shape[column] for shape in SHAPES}
        sums[layout] = {form: round(LAYERS * sum(per_layer[r["shape"]] * r["extra_us"] for r in rows if r["form"] == form)
                                    / 1000, 3) for form in sorted({r["form"] for r in rows if r["form"] != "plain"})}
    return sums


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="rows of activations (4 x 512 at the 8B bench)")
    parser.add_argument("--extras", type=int, nargs="+", default=[32, 64], help="extra rows (r and 2r at rank 32)")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("piggyback_gemm_bench: times CUDA's FP8 GEMM; no CUDA device here")
    rows, outputs = [], {}
    for name, form, extra, fn in cases(args.tokens, args.extras, "cuda"):
        out = fn()
        outputs[(name, form)] = out[:args.tokens]
        ms = median_ms(lambda: [fn() for _ in range(BACK_TO_BACK)], args.iters, warmup=2)
        rows.append({"shape": name, "form": form, "extra_rows": extra, "us": round(1000 * ms / BACK_TO_BACK, 2),
                     "first_rows_bitwise": bool(torch.equal(out[:args.tokens], outputs[(name, "plain")]))})
    plain = {r["shape"]: r["us"] for r in rows if r["form"] == "plain"}
    print(f"{args.tokens} tokens, {torch.cuda.get_device_name()}, fast accumulation, bf16 out")
    print("| shape | form | us | extra us | first rows bitwise |\n|---|---|--:|--:|---|")
    for r in rows:
        r["extra_us"] = round(r["us"] - plain[r["shape"]], 2)
        print(f"| {r['shape']} | {r['form']} | {r['us']:.1f} | {r['extra_us']:+.1f} | {r['first_rows_bitwise']} |")
    sums = forward_sums(rows)
    for layout in sums:
        print(f"one forward of the 8B model ({LAYERS} layers, {layout}), extra ms: "
              + ", ".join(f"{form} {ms:.3f}" for form, ms in sums[layout].items()))
    print("(fused q/k/v: the three layers' A's would need 3 x the extra rows in that GEMM; timed with the same count)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"tokens": args.tokens, "fp8_dtype": str(FP8), "device": torch.cuda.get_device_name(),
                       "rows": rows, "extra_ms_per_forward": sums}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
