"""rsLoRA (Kalajdzievski, 2023): LoRA with scaling alpha/sqrt(r) so that learning is rank-stable.

A layer variation: ``use_rslora: true`` in adapter_config.json; peft implements it. Everything
else (inits, optimizers) composes unchanged, since every init reads the layer's own scaling.
"""

from loralab.methods.lora import _ranks
from loralab.methods.parts import Layer


def _selects(cfg, params) -> bool:
    return bool(getattr(cfg, "use_rslora", False)) and not getattr(cfg, "use_dora", False) and not params.magnitude_only_modules


LAYER = Layer(
    name="rslora",
    summary="LoRA with scaling alpha/sqrt(r) (use_rslora)",
    selects=_selects,
    keys="adapter_config.json 'use_rslora'",
    check=_ranks,
)
