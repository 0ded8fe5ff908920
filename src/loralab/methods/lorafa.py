"""LoRA-FA (Zhang et al., 2023): A frozen at its init, only B trains, with the gradient of B
projected by (A Aᵀ)⁻¹ / s² (peft's ``create_lorafa_optimizer``, per-layer scaling).

An optimizer variation: ``optimizer: "lorafa"`` in training_parameters.json. It composes with
every init (A is frozen at whatever the init made it: Kaiming for plain LoRA-FA, the principal
singular vectors under PiSSA, ...) and refuses the DoRA layers (see ``dora.py``).
"""

from loralab.methods.common import freeze_lora_A
from loralab.methods.parts import Optimizer


def _make(model, cfg, params):
    from peft.optimizers import create_lorafa_optimizer

    return create_lorafa_optimizer(
        model, r=cfg.r, lora_alpha=cfg.lora_alpha, lr=params.learning_rate, weight_decay=params.weight_decay
    )


OPTIMIZER = Optimizer(
    name="lorafa",
    summary="A frozen, B trained with peft's LoRA-FA optimizer (projected gradient)",
    make=_make,
    prepare=lambda peft_model, cfg, params: freeze_lora_A(peft_model),
    freezes_a=True,
)
