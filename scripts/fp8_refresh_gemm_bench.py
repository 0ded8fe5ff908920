"""The FP8 DoRA norm refresh's two costly products, each in two forms, timed alone on CUDA (issue 22).

The refresh (``speed/dora_refresh.refresh_dora_norms``) takes, per layer, ``W·Aᵀ`` from the FP8 codes through
``speed/fp8.weights_times`` (through 22cac1c ``_scaled_mm(codes (N, K), [hi; lo]ᵀ (K, 2r))``, an (N x 2r) output,
2r = 64 at r32; since bbd7c40 the terms-left form below) and, per group of L layers, the Gram matrices ``A·Aᵀ``
by one float32 bmm ((L, r, K) x (L, K, r)). In the profile of results/bench-doraabl-h100 (H100, Llama-3-8B shape, FP8 base) the first ran ~20 us per layer
(224 a step: ~4.5 ms, where reading the 7.0 GB of codes takes ~2.1 ms at 3.35 TB/s) and the second ~210 us per
group. This times, at the 8B shapes:

  codes-left   ``_scaled_mm(codes, termsᵀ)``: (N, 64) out, the GEMM ``weights_times`` took through 22cac1c
               (without the sum of the two terms it adds after it)
  terms-left   ``_scaled_mm(terms, codesᵀ)``: (64, N) out, transposed after (the shape of a decode step's
               GEMM, 64 tokens against a weight: the case FP8 inference tunes)
  gram-bmm     ``a @ aᵀ`` float32 bmm, the shipped form
  gram-split   the same sum split over 8 chunks of K (``dora_refresh_forms.gram_split``: one bmm over L x 8 blocks
               of a strided view, which the bmm may copy inside the timed call, then a sum): more thread blocks

and checks that each pair gives the same values (max relative difference printed). Prints a table with
microseconds and the codes' read bandwidth; ``--output`` writes it as JSON. Each timed sample is 10 calls back to
back (``_time_us``): at ac59585 each call was timed alone and synchronised, and the launch dominated (47-82 us a
GEMM on an H100 against ~20 us inside the step's CUDA graph, results/bench-refreshforms-h100).
``dora_ablation_bench.py --refresh-forms`` times the forms graphed, as the step runs them.

    python scripts/fp8_refresh_gemm_bench.py --output $OUT/refreshgemm.json     # on a GPU, ~20 s
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from dora_refresh_forms import gram_split
from kernel_timing import median_ms

from loralab.speed.fp8 import FP8, split_rows

SHAPES = {"q, o": (4096, 4096), "k, v": (1024, 4096), "gate, up": (14336, 4096), "down": (4096, 14336)}
BACK_TO_BACK = 10


def _time_us(fn, repeats: int, device: str) -> float:
    """Microseconds per ``fn()``: the median over ``repeats`` samples (``kernel_timing``, after one untimed sample)
    of ``BACK_TO_BACK`` calls queued back to back, so the GPU's time, not each call's launch, is what counts."""

    def calls():
        for _ in range(BACK_TO_BACK):
            fn()

    return 1000 * median_ms(calls, repeats, warmup=1, device=device) / BACK_TO_BACK


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def bench(rank: int, layers: int, repeats: int, device: str = "cuda", shapes: dict = SHAPES) -> list[dict]:
    """One row per entry of ``shapes`` ({name: (N, K)}): both forms of each product timed, and their largest
    difference relative to the codes-left form's largest value (the whole bmm's for the Gram)."""
    if device == "cuda" and (2 * rank) % 16:
        raise SystemExit(f"--rank {rank}: the FP8 kernel needs 2 x rank divisible by 16 on CUDA")
    rows = []
    for name, (n, k) in shapes.items():
        torch.manual_seed(0)
        codes = (torch.randn(n, k, device=device) * 100).clamp(-448, 448).to(FP8)
        scales = torch.rand(n, device=device) + 0.5
        a = torch.randn(rank, k, device=device) / k ** 0.5
        terms, t_scales = split_rows(a)  # (2r, K), (2r, 1)

        def codes_left():
            return torch._scaled_mm(codes, terms.t(), scale_a=scales.view(-1, 1), scale_b=t_scales.view(1, -1),
                                    out_dtype=torch.bfloat16)

        def terms_left():
            return torch._scaled_mm(terms, codes.t(), scale_a=t_scales, scale_b=scales.view(1, -1),
                                    out_dtype=torch.bfloat16).t()

        same = _rel(terms_left(), codes_left())
        us_codes, us_terms = _time_us(codes_left, repeats, device), _time_us(terms_left, repeats, device)
        stack = torch.randn(layers, rank, k, device=device) / k ** 0.5

        def gram_bmm():
            return stack @ stack.transpose(-1, -2)

        def split():
            return gram_split(stack)

        same_gram = _rel(split(), gram_bmm())
        us_bmm, us_split = _time_us(gram_bmm, repeats, device), _time_us(split, repeats, device)
        gb = n * k / 1e9
        rows.append({"layers": name, "N": n, "K": k, "rank": rank, "codes_left_us": round(us_codes, 2),
                     "terms_left_us": round(us_terms, 2), "codes_left_tb_s": round(gb / us_codes * 1e3, 3),
                     "terms_left_tb_s": round(gb / us_terms * 1e3, 3), "product_max_rel_diff": same,
                     "gram_layers": layers, "gram_bmm_us": round(us_bmm, 2), "gram_split_us": round(us_split, 2),
                     "gram_max_rel_diff": same_gram})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--layers", type=int, default=64,
                   help="layers per Gram group, every shape alike (8B: 64 for q and o, k and v, gate and up; 32 for down)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--output")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA (torch._scaled_mm's row-wise FP8 kernel)", file=sys.stderr)
        return 2
    rows = bench(args.rank, args.layers, args.repeats)
    print(f"{torch.cuda.get_device_name()}, rank {args.rank}; us per call; TB/s = codes read per second")
    print("| layers | N x K | codes-left us | TB/s | terms-left us | TB/s | max rel diff | gram bmm us | gram split us |"
          " max rel diff |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['layers']} | {r['N']} x {r['K']} | {r['codes_left_us']} | {r['codes_left_tb_s']} | "
              f"{r['terms_left_us']} | {r['terms_left_tb_s']} | {r['product_max_rel_diff']:.1e} | {r['gram_bmm_us']} | "
              f"{r['gram_split_us']} | {r['gram_max_rel_diff']:.1e} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
