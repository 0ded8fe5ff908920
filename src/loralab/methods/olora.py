"""OLoRA (Büyükakyüz, 2024): QR of W; B = Q[:, :r], A = R[:r], residual W − sBA frozen.

``init_lora_weights: "olora"``; peft does the init; saved converted to rank 2r as PiSSA.
"""

from loralab.methods.common import ResidualSaver, build_peft, check_ranks

NAME = "olora"
SUMMARY = "OLoRA: orthonormal (QR) init, residual frozen (init_lora_weights=olora)"


def applies(cfg, params) -> bool:
    return cfg is not None and str(cfg.init_lora_weights).lower() == "olora"


def check(model, cfg, params) -> list[str]:
    return check_ranks(model, cfg)


def apply(model, cfg, params, ctx):
    peft_model = build_peft(model, cfg)
    return peft_model, ResidualSaver(peft_model)
