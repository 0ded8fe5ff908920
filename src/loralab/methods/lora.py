"""LoRA (Hu et al., 2021): W x + (alpha/r) B A x with A Kaiming-uniform, B = 0, W frozen.

peft does the layers and the init; this file only builds the peft model. Every other low-rank
method here is LoRA with one variation point changed (layer, init or optimizer).
"""

from loralab.methods.common import build_peft, check_ranks

NAME = "lora"
SUMMARY = "LoRA: W + (alpha/r)·B·A, A Kaiming-uniform, B = 0 (peft)"


def applies(cfg, params) -> bool:
    return cfg is not None


def check(model, cfg, params) -> list[str]:
    return check_ranks(model, cfg)


def apply(model, cfg, params, ctx):
    return build_peft(model, cfg), None
