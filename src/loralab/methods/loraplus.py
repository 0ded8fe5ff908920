"""LoRA+ (Hayou et al., ICML 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv:2402.12354): AdamW with B's learning rate λ times A's (η_B = λ·η_A), λ = 16 by default
(the paper's recommendation, 2⁴).

An optimizer variation: ``optimizer: "loraplus"`` in training_parameters.json. The learning-rate
rule is peft's ``create_loraplus_optimizer`` (and the paper's reference code): lora_B and every 1-D
trainable parameter (biases, LayerNorm, DoRA magnitudes) get λ·lr, LoRA on an embedding gets
``loraplus_lr_embedding`` (peft's 1e-6), everything else (lora_A, 2-D head weights) gets lr. λ is
``optimizer_options.loraplus_lr_ratio`` (default 16).

Deviation from peft, on purpose: peft gives every group the weight decay of its own
``loraplus_weight_decay`` keyword (default 0) and drops the ``weight_decay`` it is passed, so LoRA+
at weight decay 0.1 trained bitwise as at 0 (issue 21). Here the groups come from
``parts.param_groups``: weight decay, betas and eps are the run's, exactly as for AdamW, and the
``no_decay`` rule (no decay on biases / norms) applies only where the recipe asks for it.

Refused where A is frozen (seed 003's LoRA-FA inits, magnitude-only DoRA): with no A to be
relative to, λ is only a larger learning rate.
"""

from loralab.methods.parts import Optimizer, adamw, settings

DEFAULT_RATIO = 16.0
DEFAULT_LR_EMBEDDING = 1e-6  # peft's loraplus_lr_embedding


def lr_ratio(params) -> float:
    """λ from training_parameters ``optimizer_options.loraplus_lr_ratio`` (default 16)."""
    options = getattr(params, "optimizer_options", None) or {}
    return float(options.get("loraplus_lr_ratio", DEFAULT_RATIO))


def learning_rate_rule(params):
    """``lr_of(name, param, model)``: peft's LoRA+ grouping of learning rates."""
    from operator import attrgetter

    from peft.tuners.lora.layer import Embedding

    s = settings(params)
    ratio = lr_ratio(params)
    embedding = float(s.options.get("loraplus_lr_embedding", DEFAULT_LR_EMBEDDING))

    def lr_of(name, param, model):
        holder = ".".join(name.split(".")[:-2])  # <layer>.lora_B.default.weight -> <layer>
        if holder and isinstance(attrgetter(holder)(model), Embedding):
            return embedding
        if "lora_B" in name or param.ndim == 1:
            return s.lr * ratio
        return s.lr

    return lr_of


OPTIMIZER = Optimizer(
    name="loraplus",
    summary="AdamW with lr(B) = 16·lr(A) (peft's LoRA+ grouping; optimizer_options.loraplus_lr_ratio)",
    make=lambda model, cfg, params: adamw(model, settings(params), learning_rate_rule(params)),
    options={"loraplus_lr_ratio": DEFAULT_RATIO, "loraplus_lr_embedding": DEFAULT_LR_EMBEDDING},
)
