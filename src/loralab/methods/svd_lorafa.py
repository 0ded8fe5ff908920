"""LoRA-FA with seed 003's SVD initialisation (shredder67/svd-lorafa), reproduced as that project did it,
plus a corrected variant and the project's QR-orthonormal baseline. A is frozen in all three.

- ``init: "svd_lorafa"`` (as written in the seed): ``u, s, vh = svd(W)``; ``A = (U_r S_r)ᵀ`` (r×out),
  ``B = vh[:, :r]`` (the first r *columns* of Vh, in×r), scaling alpha/r (the seed's alpha was 1), and
  W is **not** reduced, so the initial model is W + s·B·A ≠ W. Shapes fit only for square layers
  (the seed adapted RoBERTa's 768×768 attention projections); other layers are rejected.
- ``init: "svd_lorafa_corrected"``: s·B·A equals the rank-r part U_r S_r V_rᵀ of W (A = √S_r V_rᵀ,
  B = U_r √S_r / s) and the residual W − s·B·A is frozen, so the model starts exactly at W.
  Saved converted to a rank-2r LoRA on the original base, as PiSSA.
- ``init: "lorafa_qr"`` (the seed's "kaiming" LoRA-FA baseline): A Kaiming-uniform, then
  ``Q, R = qr(Aᵀ)``, A = Qᵀ (orthonormal rows), B = B·R = 0.

The optimizer is AdamW on B (as the seed), or peft's LoRA-FA optimizer with ``optimizer: "lorafa"``.
"""

import torch

from loralab.methods import lorafa
from loralab.methods.common import ResidualSaver, build_peft, check_ranks, freeze_lora_A, lora_modules

NAME = "svd_lorafa"
SUMMARY = "LoRA-FA inits of seed 003 (init=svd_lorafa as written | svd_lorafa_corrected | lorafa_qr); A frozen"


def applies(cfg, params) -> bool:
    return cfg is not None and params.init in ("svd_lorafa", "svd_lorafa_corrected", "lorafa_qr")


def check(model, cfg, params) -> list[str]:
    from loralab.methods.common import targeted_linears

    problems = check_ranks(model, cfg)
    if params.init == "svd_lorafa":
        nonsquare = [n for n, m in targeted_linears(model, cfg).items() if m.in_features != m.out_features]
        if nonsquare:
            problems.append(
                f"'init' = 'svd_lorafa' (seed 003 as written) needs square layers, but {len(nonsquare)} target(s) are not, "
                f"e.g. {nonsquare[0]}; target square layers only (e.g. attention q/k/v/o) or use 'svd_lorafa_corrected'"
            )
    if getattr(cfg, "use_dora", False):
        problems.append(f"'init' = {params.init!r} is a LoRA-FA init and cannot be combined with use_dora")
    return problems


@torch.no_grad()
def _init_layer(layer, init: str):
    A = layer.lora_A["default"].weight
    B = layer.lora_B["default"].weight
    W = layer.get_base_layer().weight
    r, s = A.shape[0], layer.scaling["default"]
    Wf = W.float()
    if init == "svd_lorafa":
        u, sv, vh = torch.linalg.svd(Wf, full_matrices=True)
        A.copy_((u[:, :r] * sv[:r]).T)
        B.copy_(vh[:, :r])
    elif init == "svd_lorafa_corrected":
        u, sv, vh = torch.linalg.svd(Wf, full_matrices=False)
        root = sv[:r].sqrt()
        A.copy_(root[:, None] * vh[:r])
        B.copy_(u[:, :r] * root / s)
        W.copy_((Wf - s * (B.float() @ A.float())).to(W.dtype))
    elif init == "lorafa_qr":
        q, rr = torch.linalg.qr(A.float().T)
        A.copy_(q.T)
        B.copy_(B.float() @ rr.T)
    else:
        raise ValueError(init)


def apply(model, cfg, params, ctx):
    peft_model = build_peft(model, cfg)
    for _, layer in lora_modules(peft_model):
        _init_layer(layer, params.init)
    freeze_lora_A(peft_model)
    saver = ResidualSaver(peft_model) if params.init == "svd_lorafa_corrected" else None
    return peft_model, saver


def make_optimizer(model, cfg, params):
    if params.optimizer == "lorafa":
        return lorafa.make_optimizer(model, cfg, params)
    return None
