"""On a CUDA device with FP8: what ``speed.fp8_quantize_kernel`` changes, below the bench's rows.

1. Row-wise quantisation alone, at the Llama-3-8B shape's activation sizes (2,048 tokens by 4,096,
   14,336 and 1,024 columns, bf16): the torch ops eager, the torch ops compiled (what inductor makes
   of them alone), and the Triton kernel (speed/fp8_kernels.py); the kernel's codes and scales must
   equal the eager torch ops' bit for bit (exit 1 otherwise).
2. A compiled Llama MLP of FP8 layers (gate, up, down; 4,096 -> 14,336 -> 4,096; 2,048 tokens),
   forward and backward, with each kernel: where inductor fuses the quantisation into silu(gate)·up
   and its backward ("torch"), or writes the bf16 tensors and leaves the quantisation to the kernel.
The quantisations are timed as ``--iters`` calls captured in one CUDA graph and replayed (so the
op's Python dispatch and launch are not what is timed; the input, 16 to 59 MB, may sit in the
card's L2, as it often does in a step right after the kernel that wrote it); the MLP as the median
of ``--iters`` CUDA-event-timed calls after warm-up. Each variant's peak memory is its own. Prints a
table, writes JSON:

    python scripts/fp8_quant_bench.py --output $OUT/fp8quant.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

import torch
import torch.nn.functional as F
from kernel_timing import median_ms
from torch import nn

from loralab.speed.fp8 import Fp8Linear, quantize_rows, use_quantize_kernel
from loralab.speed.fp8_kernels import quantize_rows_triton


def graph_median_ms(fn, iters: int) -> float:
    """Milliseconds per call of ``fn()``: ``iters`` calls captured in one CUDA graph, replayed 5
    times, the median replay divided by ``iters``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return median_ms(graph.replay, 5, warmup=1) / iters


class Mlp(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate = Fp8Linear.from_linear(nn.Linear(hidden, inter, bias=False, device="cuda", dtype=torch.bfloat16))
        self.up = Fp8Linear.from_linear(nn.Linear(hidden, inter, bias=False, device="cuda", dtype=torch.bfloat16))
        self.down = Fp8Linear.from_linear(nn.Linear(inter, hidden, bias=False, device="cuda", dtype=torch.bfloat16))

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def mlp_row(kernel: str, tokens: int, iters: int) -> dict:
    """A compiled FP8 MLP's forward and backward with ``kernel``; its own peak memory."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    mlp = Mlp(4096, 14336)
    use_quantize_kernel(mlp, kernel)
    fn = torch.compile(mlp)
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)

    def step():
        x.grad = None
        fn(x).backward(dy)

    ms = median_ms(step, iters, warmup=3)
    return {"kernel": kernel, "fwd_bwd_ms": ms, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_quant_bench.py needs a CUDA device")
    torch.manual_seed(0)
    m = args.tokens
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": m, "iters": args.iters,
              "quantize": [], "mlp": []}
    compiled_rows = torch.compile(quantize_rows)
    ok = True
    for k in (4096, 14336, 1024):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        col = torch.rand(k, device="cuda") + 0.5
        got, want = quantize_rows_triton(x, col), quantize_rows(x.float() * col)
        same = torch.equal(got[1], want[1]) and torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
        same_plain = torch.equal(quantize_rows_triton(x)[0].view(torch.uint8), quantize_rows(x)[0].view(torch.uint8))
        ok &= same and same_plain
        row = {"cols": k, "bitwise_equal": same and same_plain,
               "torch_eager_ms": graph_median_ms(lambda: quantize_rows(x), args.iters),
               "torch_compiled_ms": graph_median_ms(lambda: compiled_rows(x), args.iters),
               "triton_ms": graph_median_ms(lambda: quantize_rows_triton(x), args.iters)}
        row["triton_GBps"] = round(m * k * 3 / row["triton_ms"] / 1e6, 1)  # bf16 read + fp8 written
        report["quantize"].append(row)
    for kernel in ("torch", "triton"):
        report["mlp"].append(mlp_row(kernel, m, args.iters))
    report["ok"] = ok
    print(f"{'quantise (bf16 in)':<22} {'torch eager':>12} {'torch compiled':>15} {'triton':>9} {'GB/s':>7}  bits")
    for r in report["quantize"]:
        print(f"{m} x {r['cols']:<15} {r['torch_eager_ms']:>10.3f}ms {r['torch_compiled_ms']:>13.3f}ms "
              f"{r['triton_ms']:>7.3f}ms {r['triton_GBps']:>7}  {'equal' if r['bitwise_equal'] else 'DIFFER'}")
    for r in report["mlp"]:
        print(f"compiled FP8 MLP fwd+bwd, kernel {r['kernel']:<7} {r['fwd_bwd_ms']:.3f} ms  (peak {r['peak_gib']} GiB)")
    text = json.dumps(report, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
