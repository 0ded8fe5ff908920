"""LoRA-FA (Zhang et al., 2023): A frozen at its init, only B trains, with the gradient of B
projected by (A Aᵀ)⁻¹ / s² (peft's ``create_lorafa_optimizer``).

Chosen by ``optimizer: "lorafa"`` in training_parameters.json with a plain LoRA adapter config.
"""

from loralab.methods import lora
from loralab.methods.common import build_peft, freeze_lora_A

NAME = "lorafa"
SUMMARY = "LoRA-FA: A frozen, B trained with peft's LoRA-FA optimizer (optimizer=lorafa)"


def applies(cfg, params) -> bool:
    return cfg is not None and params.optimizer == "lorafa" and params.init is None


check = lora.check


def apply(model, cfg, params, ctx):
    peft_model = build_peft(model, cfg)
    freeze_lora_A(peft_model)  # the method's own trainable set, before any optimizer exists
    return peft_model, None


def make_optimizer(model, cfg, params):
    from peft.optimizers import create_lorafa_optimizer

    return create_lorafa_optimizer(
        model, r=cfg.r, lora_alpha=cfg.lora_alpha, lr=params.learning_rate, weight_decay=params.weight_decay
    )
