"""PiSSA (Meng et al., 2024): adapter = top-r singular triplets of W, residual W − U_r S_r V_rᵀ frozen.

``init_lora_weights: "pissa"`` (exact SVD) or ``"pissa_niter_N"`` (randomized, N subspace
iterations) in adapter_config.json; peft does the init. The model starts exactly at W. Because the
base weight changes, the trained adapter is saved converted to a plain rank-2r LoRA on the original
base (ΔW = BA − B₀A₀), which plain ``PeftModel.from_pretrained`` loads.
"""

from loralab.methods.common import ResidualSaver, build_peft, check_ranks

NAME = "pissa"
SUMMARY = "PiSSA: principal singular components as the adapter, residual frozen (init_lora_weights=pissa[_niter_N])"


def applies(cfg, params) -> bool:
    return cfg is not None and str(cfg.init_lora_weights).lower().startswith("pissa")


def check(model, cfg, params) -> list[str]:
    return check_ranks(model, cfg)


def apply(model, cfg, params, ctx):
    peft_model = build_peft(model, cfg)
    return peft_model, ResidualSaver(peft_model)
