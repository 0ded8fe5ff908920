"""Causal attention at the 8B bench's shape by each of torch's SDPA backends, timed alone on CUDA (issue 22).

In the profile of results/bench-profile-h100-1206 the step's attention (torch's flash kernels, chosen by SDPA's
default order) took ~8 ms a step of bf16 LoRA at 4 x 512 tokens: ~130 TFLOP/s in the forward and ~110 in the
backward, for 32 layers of 32 query heads (8 key/value heads), head size 128. This times forward + backward of
``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`` with each backend that runs the
shape (``torch.nn.attention.sdpa_kernel``) and checks each against the math backend in float32 (max relative
difference of the output and the three gradients). Prints a table; ``--output`` writes JSON.

    python scripts/sdpa_backend_bench.py --output $OUT/sdpa.json     # on a GPU, ~15 s
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from kernel_timing import median_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def inputs(batch, seq, heads, kv_heads, head_dim, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, generator=g)
    grad = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=g)
    return [t.requires_grad_(True) for t in (q, k, v)], grad


def run(backend, tensors, grad):
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(*tensors, is_causal=True, enable_gqa=True)
        grads = torch.autograd.grad(out, tensors, grad)
    return out, grads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4x512,1x2048,8x512")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    device, rows = "cuda", []
    for shape in args.shapes.split(","):
        batch, seq = (int(v) for v in shape.split("x"))
        tensors, grad = inputs(batch, seq, 32, 8, 128, device, torch.bfloat16)
        ref_in = [t.detach().float().requires_grad_(True) for t in tensors]
        ref = run(SDPBackend.MATH, ref_in, grad.float())
        for name, backend in BACKENDS.items():
            try:
                got = run(backend, tensors, grad)
            except RuntimeError as err:
                rows.append({"shape": shape, "backend": name, "error": str(err).splitlines()[0][:200]})
                continue
            diff = max(float((a.float() - b).abs().max() / b.abs().max()) for a, b in zip((got[0], *got[1]), (ref[0], *ref[1])))
            ms = median_ms(lambda: [run(backend, tensors, grad) for _ in range(10)], args.iters, warmup=2) / 10
            flops = 4 * batch * 32 * seq * seq * 128 / 2 * 3.5  # causal: half; backward 2.5x the forward
            rows.append({"shape": shape, "backend": name, "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1),
                         "max_rel_diff_vs_math_fp32": diff})
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, 32 query / 8 kv heads of 128, causal, fwd + bwd")
    print("| batch x seq | backend | ms | TFLOP/s | max rel diff vs fp32 math |\n|---|---|--:|--:|--:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['backend']} | error: {r['error']} | | |")
        else:
            print(f"| {r['shape']} | {r['backend']} | {r['ms']:.3f} | {r['tflops']} | {r['max_rel_diff_vs_math_fp32']:.1e} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
