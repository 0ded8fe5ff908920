"""rsLoRA (Kalajdzievski, 2023): LoRA with scaling alpha/sqrt(r) so that learning is rank-stable.

Chosen by ``use_rslora: true`` in adapter_config.json; peft implements it.
"""

from loralab.methods import lora

NAME = "rslora"
SUMMARY = "rsLoRA: LoRA with scaling alpha/sqrt(r) (use_rslora)"


def applies(cfg, params) -> bool:
    return cfg is not None and bool(getattr(cfg, "use_rslora", False)) and not getattr(cfg, "use_dora", False)


check = lora.check
apply = lora.apply
