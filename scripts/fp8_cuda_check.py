"""On a CUDA device with FP8 (compute capability >= 8.9): does ``loralab.speed.fp8``'s CUDA path compute the
scaling rule its docstring states? For a few shapes (the 8B shape's q/k/v/o, MLP projections, odd token counts),
bf16 activations and weights go through ``fp8_linear`` on CUDA, forward and input gradient, and are compared with
the rule written out in float32 on the same device: ``(xq * s_x) @ (Wq * s_w)ᵀ`` for the forward and
``(Gq * s_g) @ Wq`` with ``G = dy * s_w`` for the input gradient, from ``quantize_rows``' codes and scales. They
differ only by accumulation order and the kernel's bfloat16 output. (torch 2.11's CPU ``_scaled_mm`` takes
per-tensor scales only, so the CPU kernel cannot be the reference there; in torch 2.13 it can, and the CPU tests
do.) Also the relative error against the float product, as a sanity bound, and fast DoRA's ``weight_times``
(W·Aᵀ for r = 32 from the codes) against float32, which must be within twice the bf16 path's error. The same
forward and gradient with ``fast_accum="all"`` (``speed.fp8_fast_accum``: no float32 promotion of the partial
sums on Hopper) against the same rule and tolerance, beside the default's errors. Prints and writes JSON
(``--output``); exits 1 when a CUDA result is further from the rule than ``--tol`` (relative Frobenius error).

    python scripts/fp8_cuda_check.py --output $OUT/fp8check.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from loralab.speed.fp8 import fp8_linear, quantize_rows, weight_times


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
    xd = x.cuda().requires_grad_(True)
    y = fp8_linear(xd, codes.cuda(), scales.cuda())
    y.backward(dy.cuda())
    out["dtypes_cuda"] = [str(y.dtype), str(xd.grad.dtype)]
    y, dx = y.detach().float(), xd.grad.float()
    xq, sx = quantize_rows(x.cuda())
    y_rule = (xq.float() * sx) @ (codes.cuda().float() * scales.cuda()[:, None]).t()
    gq, sg = quantize_rows(dy.cuda().float() * scales.cuda().view(1, -1))
    dx_rule = (gq.float() * sg) @ codes.cuda().float()
    y_ref = x.cuda().float() @ w.cuda().float().t()
    dx_ref = dy.cuda().float() @ w.cuda().float()
    out["forward_cuda_vs_rule"] = rel(y, y_rule)
    out["grad_cuda_vs_rule"] = rel(dx, dx_rule)
    out["forward_cuda_vs_float"] = rel(y, y_ref)
    out["grad_cuda_vs_float"] = rel(dx, dx_ref)
    xf = x.cuda().requires_grad_(True)
    yf = fp8_linear(xf, codes.cuda(), scales.cuda(), fast_accum="all")
    yf.backward(dy.cuda())
    out["forward_fast_accum_vs_rule"] = rel(yf.detach(), y_rule)
    out["grad_fast_accum_vs_rule"] = rel(xf.grad, dx_rule)
    # fast DoRA's W·Aᵀ from the codes (weight_times: A in two FP8 terms) against the float32 product of the
    # dequantised weight, beside the bf16 path it replaces (codes and A in bf16)
    a = (torch.randn(32, k, generator=g) / k**0.5).cuda()
    wa_ref = (codes.cuda().float() * scales.cuda()[:, None]) @ a.t()
    wa_bf16 = (codes.cuda().to(torch.bfloat16) @ a.to(torch.bfloat16).t()).float() * scales.cuda()[:, None]
    out["weight_times_cuda_vs_float"] = rel(weight_times(codes.cuda(), scales.cuda(), a), wa_ref)
    out["weight_times_bf16_path_vs_float"] = rel(wa_bf16, wa_ref)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=None)
    ap.add_argument("--tol", type=float, default=1e-2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_cuda_check.py needs a CUDA device")
    cap = torch.cuda.get_device_capability()
    shapes = [(37, 4096, 4096), (512, 4096, 1024), (2048, 4096, 14336), (2048, 14336, 4096), (1, 64, 32)]
    rows = [check(*s) for s in shapes]
    report = {"device": torch.cuda.get_device_name(), "capability": list(cap), "torch": torch.__version__,
              "tol": args.tol, "rows": rows,
              "ok": all(max(r["forward_cuda_vs_rule"], r["grad_cuda_vs_rule"], r["forward_fast_accum_vs_rule"],
                            r["grad_fast_accum_vs_rule"]) <= args.tol
                        and r["weight_times_cuda_vs_float"] <= 2 * r["weight_times_bf16_path_vs_float"] for r in rows)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
