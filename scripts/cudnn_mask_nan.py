"""Does masked SDPA's backward give NaN at key lengths of 64 modulo 128 on this GPU, and is loralab's guarded width
clean? (pytorch/pytorch#196678; the guard is ``speed/attention.py``'s ``masked_width``, applied by the training step.)

The report's conditions: an explicit mask (here causal, boolean), a key length of 64 modulo 128, and query rows whose
logsumexp is below about -88.7 (every logit near -120: q's first channel 1, k's -120·sqrt(D)). For each width and
each kernel choice (torch's default order, cuDNN forced, the efficient kernel forced) this counts the non-finite
elements of grad_q, grad_k and grad_v, and does the same at the widths the training step pads it to
(``step_width``: with CUDA graphs' buckets and without). Prints a table; ``--output``
writes JSON. On a GPU, seconds; on CPU (torch's math kernel) every count is 0, a check that the script runs.

    python scripts/cudnn_mask_nan.py --output $OUT/cudnn_mask_nan.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from loralab.speed.attention import cudnn_masked_width_risk, step_width

WIDTHS = (64, 192, 320, 704, 128, 256, 768)
KERNELS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


def non_finite_grads(width: int, device: str, kernel=None, head_dim: int = 64, dtype=torch.bfloat16) -> dict:
    """{"q": n, "k": n, "v": n} non-finite gradient elements of one masked causal SDPA call of ``width`` tokens whose
    rows' logsumexp is about -120; {"error": message} where the chosen kernel refuses it."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 1, width, head_dim, device=device, dtype=dtype, generator=g) * 0.1
    k = torch.randn(1, 1, width, head_dim, device=device, dtype=dtype, generator=g) * 0.1
    v = torch.randn(1, 1, width, head_dim, device=device, dtype=dtype, generator=g)
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(head_dim)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = torch.ones(width, width, dtype=torch.bool, device=device).tril()[None, None]
    try:
        with sdpa_kernel([kernel]) if kernel is not None else torch.enable_grad():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out.backward(torch.randn(out.shape, device=device, dtype=dtype, generator=g))
    except RuntimeError as err:
        return {"error": str(err).splitlines()[0][:120]}
    return {name: int((~torch.isfinite(t.grad)).sum()) for name, t in (("q", q), ("k", k), ("v", v))}


def run(device: str, widths=WIDTHS, kernels=None) -> dict:
    kernels = kernels or (list(KERNELS) if device == "cuda" else ["default"])
    rows = []
    for width in widths:
        for name in kernels:
            unguarded = non_finite_grads(width, device, KERNELS[name])
            for bucketed in (True, False):  # the step's widths with CUDA graphs (bucketed) and without
                guarded = step_width(width, bucketed)
                rows.append({"width": width, "kernel": name, "non_finite": unguarded, "bucketed": bucketed,
                             "guarded_width": guarded, "guarded_non_finite": non_finite_grads(guarded, device, KERNELS[name])})
    info = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "guarded_here": cudnn_masked_width_risk(torch.device(device))}
    return {"info": info, "rows": rows}


def table(result: dict) -> str:
    def cell(v):
        return v.get("error", f"q {v['q']}, k {v['k']}, v {v['v']}")
    lines = [f"{result['info']}", "", "| width | kernel | non-finite grads | guarded width | non-finite there |",
             "|--:|---|---|--:|---|"]
    lines += [f"| {r['width']} | {r['kernel']} | {cell(r['non_finite'])} | {r['guarded_width']}"
              f"{' (bucketed)' if r['bucketed'] else ''} | {cell(r['guarded_non_finite'])} |" for r in result["rows"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output")
    args = p.parse_args(argv)
    result = run(args.device)
    print(table(result))
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
