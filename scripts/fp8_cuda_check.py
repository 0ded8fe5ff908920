"""On a CUDA device with FP8 (compute capability >= 8.9): does ``loralab.speed.fp8``'s CUDA path compute what
its CPU reference kernel computes? For a few shapes (the 8B shape's q/k/v/o, MLP projections, odd token counts),
the same bf16 activations and weights go through ``fp8_linear`` on CUDA and on CPU (torch's reference
``_scaled_mm``), forward and input gradient; both start from the same FP8 codes and scales, so they differ only
by accumulation order and CUDA's bfloat16 output rounding. Also the relative error of each against the float
product, as a sanity bound. Prints and writes JSON (``--output``); exits 1 when a CUDA result is further from the
CPU reference than ``--tol`` (relative Frobenius error).

    python scripts/fp8_cuda_check.py --output $OUT/fp8check.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from loralab.speed.fp8 import fp8_linear, quantize_rows


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def check(m: int, k: int, n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    dy = torch.randn(m, n, generator=g).bfloat16()
    codes, scales = quantize_rows(w)
    scales = scales.reshape(-1)
    out = {"m": m, "k": k, "n": n}
    results = {}
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_(True)
        y = fp8_linear(xd, codes.to(device), scales.to(device))
        y.backward(dy.to(device))
        results[device] = (y.detach().cpu(), xd.grad.cpu(), y.dtype, xd.grad.dtype)
    y_ref = x.float() @ w.float().t()
    dx_ref = dy.float() @ w.float()
    out["dtypes_cuda"] = [str(results["cuda"][2]), str(results["cuda"][3])]
    out["forward_cuda_vs_cpu"] = rel(results["cuda"][0], results["cpu"][0])
    out["grad_cuda_vs_cpu"] = rel(results["cuda"][1], results["cpu"][1])
    out["forward_cuda_vs_float"] = rel(results["cuda"][0], y_ref)
    out["grad_cuda_vs_float"] = rel(results["cuda"][1], dx_ref)
    out["forward_cpu_vs_float"] = rel(results["cpu"][0], y_ref)
    out["grad_cpu_vs_float"] = rel(results["cpu"][1], dx_ref)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=None)
    ap.add_argument("--tol", type=float, default=1e-2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_cuda_check.py needs a CUDA device")
    cap = torch.cuda.get_device_capability()
    shapes = [(37, 4096, 4096), (512, 4096, 1024), (512, 4096, 14336), (512, 14336, 4096), (1, 64, 32)]
    rows = [check(*s) for s in shapes]
    report = {"device": torch.cuda.get_device_name(), "capability": list(cap), "torch": torch.__version__,
              "tol": args.tol, "rows": rows,
              "ok": all(r["forward_cuda_vs_cpu"] <= args.tol and r["grad_cuda_vs_cpu"] <= args.tol for r in rows)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
