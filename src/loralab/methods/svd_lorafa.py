"""LoRA-FA with seed 003's SVD initialisation (shredder67/svd-lorafa), reproduced as that project did it,
plus a corrected variant and the project's QR-orthonormal baseline. A is frozen in all three
(the init is A, as in LoRA-FA); the optimizer is AdamW on B (as the seed), or peft's LoRA-FA
optimizer with ``optimizer: "lorafa"``. Three init variations, each selected by training_parameters
``init``:

- ``svd_lorafa`` (as written in the seed): ``u, s, vh = svd(W)``; ``A = (U_r S_r)ᵀ`` (r×out),
  ``B = vh[:, :r]`` (the first r *columns* of Vh, in×r), scaling alpha/r (the seed's alpha was 1), and
  W is **not** reduced, so the initial model is W + s·B·A ≠ W. Shapes fit only for square layers
  (the seed adapted RoBERTa's 768×768 attention projections); other layers are rejected.
- ``svd_lorafa_corrected``: s·B·A equals the rank-r part U_r S_r V_rᵀ of W (A = √S_r V_rᵀ,
  B = U_r √S_r / s) and the residual W − s·B·A is frozen, so the model starts exactly at W.
  Saved converted to a rank-2r LoRA on the original base, as PiSSA.
- ``lorafa_qr`` (the seed's "kaiming" LoRA-FA baseline): A Kaiming-uniform, then
  ``Q, R = qr(Aᵀ)``, A = Qᵀ (orthonormal rows), B = B·R = 0.

LoRA+ is refused with these inits: it sets B's learning rate relative to A's, and A is frozen here.
"""

import torch

from loralab.methods.common import build_peft, init_each_layer, targeted_linears
from loralab.methods.parts import Init

_LORAPLUS = "LoRA+ sets B's learning rate relative to A's, and this init freezes A"


def _as_written(layer):
    A = layer.lora_A["default"].weight
    r = A.shape[0]
    u, sv, vh = torch.linalg.svd(layer.get_base_layer().weight.float(), full_matrices=True)
    return (u[:, :r] * sv[:r]).T, vh[:, :r]


def _corrected(layer):
    r, s = layer.r["default"], layer.scaling["default"]
    u, sv, vh = torch.linalg.svd(layer.get_base_layer().weight.float(), full_matrices=False)
    root = sv[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root / s


def _qr(layer):
    A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    q, rr = torch.linalg.qr(A.T)
    return q.T, B @ rr.T


def _builder(factors, residual):
    def build(model, cfg, params, ctx):
        peft_model = build_peft(model, cfg)
        init_each_layer(peft_model, factors, residual=residual)
        return peft_model

    return build


def _square_only(model, cfg, params) -> list[str]:
    nonsquare = [n for n, m in targeted_linears(model, cfg).items() if m.in_features != m.out_features]
    if nonsquare:
        return [
            f"'init' = 'svd_lorafa' (seed 003 as written) needs square layers, but {len(nonsquare)} target(s) are not, "
            f"e.g. {nonsquare[0]}; target square layers only (e.g. attention q/k/v/o) or use 'svd_lorafa_corrected'"
        ]
    return []


AS_WRITTEN = Init(
    name="svd_lorafa",
    summary="seed 003 as written: A = (U_r S_r)ᵀ, B = Vh[:, :r], W unchanged (starts off W); A frozen",
    key="init",
    values=("svd_lorafa",),
    build=_builder(_as_written, residual=False),
    check=_square_only,
    freezes_a=True,
    preserves_output=False,
    refuses={"optimizer:loraplus": _LORAPLUS},
    base="float",
)
CORRECTED = Init(
    name="svd_lorafa_corrected",
    summary="s·B·A = rank-r part of W, residual frozen; A frozen",
    key="init",
    values=("svd_lorafa_corrected",),
    build=_builder(_corrected, residual=True),
    residual=True,
    freezes_a=True,
    base="float",
    refuses={"optimizer:loraplus": _LORAPLUS},
)
QR = Init(
    name="lorafa_qr",
    summary="seed 003's baseline: A = orthonormalised Kaiming draw, B = 0; A frozen",
    key="init",
    values=("lorafa_qr",),
    build=_builder(_qr, residual=False),
    freezes_a=True,
    refuses={"optimizer:loraplus": _LORAPLUS},
)
