"""LoRA+ (Hayou et al., ICML 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv:2402.12354): AdamW with B's learning rate λ times A's (η_B = λ·η_A), λ = 16 by default
(the paper's recommendation, 2⁴).

An optimizer variation through peft's ``create_loraplus_optimizer``: ``optimizer: "loraplus"`` in
training_parameters.json; λ is ``optimizer_options.loraplus_lr_ratio`` (default 16). peft's
grouping, kept as it is: lora_B and every 1-D trainable parameter (biases, LayerNorm, DoRA
magnitudes) get λ·lr and no weight decay (peft's ``loraplus_weight_decay`` = 0); lora_A and the
2-D head weights get lr and ``weight_decay``. Refused where A is frozen (seed 003's LoRA-FA inits,
magnitude-only DoRA): with no A to be relative to, λ is only a larger learning rate.
"""

from loralab.methods.parts import Optimizer

DEFAULT_RATIO = 16.0


def lr_ratio(params) -> float:
    """λ from training_parameters ``optimizer_options.loraplus_lr_ratio`` (default 16)."""
    options = getattr(params, "optimizer_options", None) or {}
    return float(options.get("loraplus_lr_ratio", DEFAULT_RATIO))


def _make(model, cfg, params):
    import torch
    from peft.optimizers import create_loraplus_optimizer

    fused = any(p.is_cuda for p in model.parameters() if p.requires_grad)
    return create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=params.learning_rate, loraplus_lr_ratio=lr_ratio(params),
        weight_decay=params.weight_decay, fused=fused,
    )


OPTIMIZER = Optimizer(
    name="loraplus",
    summary="AdamW with lr(B) = 16·lr(A) (peft create_loraplus_optimizer; optimizer_options.loraplus_lr_ratio)",
    make=_make,
)
