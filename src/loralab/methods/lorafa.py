"""LoRA-FA (Zhang et al., 2023): A frozen at its init, only B trains, with the gradient of B
projected by (A Aᵀ)⁻¹ / s² (peft's ``LoraFAOptimizer``, per-layer scaling).

An optimizer variation: ``optimizer: "lorafa"`` in training_parameters.json. It composes with
every init (A is frozen at whatever the init made it: Kaiming for plain LoRA-FA, the principal
singular vectors under PiSSA, ...) and refuses the DoRA layers (see ``dora.py``).

peft's ``create_lorafa_optimizer`` freezes A and finds each layer's scaling; its one parameter
group has fixed betas (0.9, 0.999) and the optimizer's own eps (1e-6). Here the groups are rebuilt
with the run's settings (``parts.settings``): learning rate, weight decay, betas and eps as every
optimizer part has them (eps therefore torch AdamW's 1e-8 unless ``optimizer_options.eps`` says
otherwise; runs before issue 21 used 1e-6), and the ``no_decay`` rule on the parameters that are
not LoRA factors (a layer's lora_A and lora_B stay together in one group: the update pairs them).
Its weight decay is decoupled, ``p -= lr·wd·p`` after the Adam step (peft's order).
"""

from loralab.methods.common import freeze_lora_A
from loralab.methods.parts import Optimizer, decayed, settings


def _make(model, cfg, params):
    from peft.optimizers import create_lorafa_optimizer
    from peft.optimizers import lorafa as peft_lorafa
    from peft.optimizers.lorafa import LoraFAOptimizer

    s = settings(params)
    # peft >= 0.18 reads r and lora_alpha from the LoraConfig and warns (FutureWarning, an error in peft 1.2) when
    # they are passed; earlier versions (pyproject allows 0.17) need them
    legacy = {} if hasattr(peft_lorafa, "_create_lorafa_optimizer_legacy") else {"r": cfg.r, "lora_alpha": cfg.lora_alpha}
    peft_group = create_lorafa_optimizer(model, lr=s.lr, weight_decay=s.weight_decay, **legacy).param_groups[0]
    decay = decayed(model, s.no_decay)
    groups: dict = {}
    for p, name, scaling in zip(peft_group["params"], peft_group["names"], peft_group["scaling_factors"]):
        if "lora" in name:
            key = "lora"
        elif name in decay:  # trainable and not a LoRA factor (e.g. the classification head)
            key = "decay" if decay[name] else "no_decay"
        else:
            continue  # frozen base weights: peft's step skips them (no gradient)
        group = groups.setdefault(key, {"params": [], "names": [], "scaling_factors": [], "lr": s.lr, "betas": s.betas,
                                        "eps": s.eps, "weight_decay": 0.0 if key == "no_decay" else s.weight_decay})
        group["params"].append(p)
        group["names"].append(name)
        group["scaling_factors"].append(scaling)
    return LoraFAOptimizer(list(groups.values()), lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)


OPTIMIZER = Optimizer(
    name="lorafa",
    summary="A frozen, B trained with peft's LoRA-FA optimizer (projected gradient)",
    make=_make,
    prepare=lambda peft_model, cfg, params: freeze_lora_A(peft_model),
    freezes_a=True,
)
