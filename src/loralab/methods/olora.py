"""OLoRA (Büyükakyüz, 2024): QR of W; B = Q[:, :r], A = R[:r], residual W − sBA frozen.

An init variation: ``init_lora_weights: "olora"``; peft does the init; saved converted to rank 2r
as PiSSA. Shares the LoRA layer and every optimizer.
"""

from loralab.methods.common import build_peft
from loralab.methods.parts import Init

INIT = Init(
    name="olora",
    summary="orthonormal (QR) init, residual frozen (init_lora_weights=olora)",
    key="init_lora_weights",
    values=("olora",),
    build=lambda model, cfg, params, ctx: build_peft(model, cfg),
    residual=True,
    base="float",
)
