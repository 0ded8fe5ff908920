"""The FP8 DoRA refresh's ``W·Aᵀ`` at Llama-3-8B's four groups, by the shipped cuBLAS products
(``speed/fp8.weights_times``) and by ``speed/fp8_kernels.weights_times_triton`` at every tile and launch of a grid
(issue 22): which launch reads the 7.0 GB of codes fastest, and at what bandwidth.

``dora_ablation_bench.py --refresh-forms`` (results/bench-tritonproduct-h100) timed the whole refresh graphed with the
kernel at 128 x 128, 8 warps, 3 stages (the tile chosen by reading the sm90 build, not by timing): 4.045 ms against the
shipped 5.143 ms; at 256 x 64, 4 stages, 5.394 ms. This times the product alone, per group and summed over the step's
groups (q and o, k and v, gate and up: 64 layers each; down: 32), each sample ``BACK_TO_BACK`` calls queued back to back
(``kernel_timing.median_ms``), and checks every launch gives the default's values (largest difference relative to
the largest value). A launch that does not fit the card (shared memory, registers) is listed with its error.

    python scripts/refresh_product_sweep.py --output $OUT/sweep.json     # on a GPU, ~3 min (one compile a launch)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
from dora_refresh_forms import current_launch, launch
from kernel_timing import median_ms

from loralab.speed import fp8_kernels
from loralab.speed.fp8 import FP8, weights_times

GROUPS = {"q, o": (4096, 4096, 64), "k, v": (1024, 4096, 64), "gate, up": (14336, 4096, 64), "down": (4096, 14336, 32)}
BACK_TO_BACK = 5


def launches(block_n=(64, 128, 256), block_k=(64, 128, 256), warps=(4, 8), stages=(3, 4, 5)) -> list[tuple]:
    """Every (BLOCK_N, BLOCK_K, warps, stages) of the grid."""
    return list(itertools.product(block_n, block_k, warps, stages))


def _time_ms(fn, repeats: int, device: str) -> float:
    def calls():
        for _ in range(BACK_TO_BACK):
            fn()

    return median_ms(calls, repeats, warmup=1, device=device) / BACK_TO_BACK


def _group(n: int, k: int, layers: int, rank: int, device: str):
    """``layers`` separate (N, K) code tensors (the layers' own, as the refresh reads them), their scales, A."""
    codes = [(torch.randn(n, k, device=device) * 100).clamp(-448, 448).to(FP8) for _ in range(layers)]
    scales = [torch.rand(n, device=device) * 1e-3 + 1e-4 for _ in range(layers)]
    return codes, scales, torch.randn(layers, rank, k, device=device) / k ** 0.5


def sweep(grid: list[tuple], rank: int, repeats: int, device: str = "cuda", groups: dict = GROUPS) -> dict:
    """{"shipped": {group: ms}, "launches": [{launch, ms per group, total_ms, tb_s, max_rel_diff or error}]},
    sorted fastest first. Sets ``fp8_kernels``' launch globals for each and restores them after."""
    default = current_launch()
    data = {name: _group(*shape, rank, device) for name, shape in groups.items()}
    gb = sum(n * k * layers for n, k, layers in groups.values()) / 1e9
    shipped = {name: _time_ms(lambda d=d: weights_times(*d), repeats, device) for name, d in data.items()}
    reference = {name: fp8_kernels.weights_times_triton(*d) for name, d in data.items()}
    rows = []
    for tile in grid:
        row = {"launch": list(tile)}
        try:
            with launch(tile):
                diff = max(float((fp8_kernels.weights_times_triton(*d) - reference[name]).abs().max()
                                 / reference[name].abs().max()) for name, d in data.items())
                per = {name: _time_ms(lambda d=d: fp8_kernels.weights_times_triton(*d), repeats, device)
                       for name, d in data.items()}
            row.update(ms=per, total_ms=sum(per.values()), tb_s=gb / sum(per.values()), max_rel_diff=diff)
        except Exception as exc:  # a launch the card cannot hold (shared memory, registers): listed, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        rows.append(row)
        print(_line(row), flush=True)
    rows.sort(key=lambda r: r.get("total_ms", float("inf")))
    return {"shipped": shipped, "shipped_total_ms": sum(shipped.values()), "shipped_tb_s": gb / sum(shipped.values()),
            "default": list(default), "codes_gb": gb, "rank": rank, "launches": rows}


def _line(row: dict) -> str:
    n, k, w, s = row["launch"]
    if "error" in row:
        return f"| {n} x {k} | {w} | {s} | | | | | | | {row['error']} |"
    ms = row["ms"]
    return (f"| {n} x {k} | {w} | {s} | " + " | ".join(f"{v:.3f}" for v in ms.values())
            + f" | {row['total_ms']:.3f} | {row['tb_s']:.2f} | {row['max_rel_diff']:.1e} | |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--output")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA (the Triton kernel's float8 widening and the row-wise FP8 GEMM)", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, rank {args.rank}; ms per call of a group; TB/s = codes read per second")
    print("| tile | warps | stages | " + " | ".join(GROUPS) + " | total ms | TB/s | max rel diff | error |")
    print("|---|--:|--:|" + "--:|" * (len(GROUPS) + 3) + "---|")
    out = sweep(launches(), args.rank, args.repeats)
    print("| shipped cuBLAS | | | " + " | ".join(f"{v:.3f}" for v in out["shipped"].values())
          + f" | {out['shipped_total_ms']:.3f} | {out['shipped_tb_s']:.2f} | | |")
    print("fastest first:")
    for row in out["launches"][:8]:
        print(_line(row))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
