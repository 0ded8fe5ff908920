"""LoRA (Hu et al., 2021): W x + s·B A x with s = alpha/r, A Kaiming-uniform, B = 0, W frozen;
trained with AdamW.

peft does the layer and the init; this file declares LoRA's three parts: the ``lora`` layer, the
``kaiming`` init (peft's default, ``init_lora_weights: true``; ``"gaussian"`` draws A from
N(0, 1/r) instead) and the ``adamw`` optimizer (torch AdamW over every trainable parameter, with
the run's learning rate, weight decay, betas, eps and ``no_decay`` rule: ``parts.adamw``; full
fine-tuning uses it too). Every other method here changes one of these parts.
"""

from loralab.methods.common import build_peft, check_ranks
from loralab.methods.parts import Init, Layer, Optimizer, adamw, settings


def _plain(cfg, params) -> bool:
    return not getattr(cfg, "use_dora", False) and not getattr(cfg, "use_rslora", False) and not params.magnitude_only_modules


def _ranks(model, cfg, params) -> list[str]:
    return check_ranks(model, cfg)


LAYER = Layer(
    name="lora",
    summary="W + (alpha/r)·B·A (peft LoRA layer)",
    selects=_plain,
    keys="adapter_config.json (no use_dora, no use_rslora)",
    check=_ranks,
)


def _build(model, cfg, params, ctx):
    return build_peft(model, cfg)


KAIMING = Init(
    name="kaiming",
    summary="A Kaiming-uniform, B = 0 (peft default, init_lora_weights=true)",
    key="init_lora_weights",
    values=(True,),
    build=_build,
)
GAUSSIAN = Init(
    name="gaussian",
    summary="A ~ N(0, 1/r), B = 0 (init_lora_weights='gaussian')",
    key="init_lora_weights",
    values=("gaussian",),
    build=_build,
)
ADAMW = Optimizer(
    name="adamw",
    summary="torch AdamW over every trainable parameter (the run's default)",
    make=lambda model, cfg, params: adamw(model, settings(params)),
)
