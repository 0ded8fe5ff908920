"""PiSSA (Meng et al., 2024): adapter = top-r singular triplets of W, residual W − U_r S_r V_rᵀ frozen.

An init variation: ``init_lora_weights: "pissa"`` (exact SVD) or ``"pissa_niter_N"`` (randomized,
N subspace iterations) in adapter_config.json; peft does the init (A = √(S_r/s)·V_rᵀ,
B = U_r·√(S_r/s)). The model starts exactly at W. Because the base weight changes, the trained
adapter is saved converted to a plain rank-2r LoRA on the original base (ΔW = BA − B₀A₀), which
plain ``PeftModel.from_pretrained`` loads. Shares the LoRA layer and every optimizer.
"""

from loralab.methods.common import build_peft
from loralab.methods.parts import Init

INIT = Init(
    name="pissa",
    summary="principal r singular triplets as the adapter, residual frozen (init_lora_weights=pissa[_niter_N])",
    key="init_lora_weights",
    values=("pissa", "pissa_niter_"),
    build=lambda model, cfg, params, ctx: build_peft(model, cfg),
    residual=True,
    base="float",
)
