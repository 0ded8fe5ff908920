"""MiLoRA (Wang et al., 2024, "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient
LLM Finetuning", arXiv:2406.09044): the adapter holds the r *smallest* singular triplets of W,
W = U S Vᵀ, A = √(S_min/s)·V_minᵀ, B = U_min·√(S_min/s); the residual W − s·B·A (the principal
part) is frozen, so the model starts exactly at W. PiSSA with the other end of the spectrum.

An init variation: ``init: "milora"`` in training_parameters.json (peft 0.21 has no MiLoRA); the
factors are written by the shared ``common.init_each_layer`` helper. Saved converted to a plain
rank-2r LoRA on the original base, as PiSSA. Shares the LoRA layer and every optimizer.
"""

from loralab.methods.common import build_peft, init_each_layer, svd_factors
from loralab.methods.parts import Init


def _build(model, cfg, params, ctx):
    peft_model = build_peft(model, cfg)
    init_each_layer(
        peft_model,
        lambda layer: svd_factors(layer.get_base_layer().weight, layer.r["default"], layer.scaling["default"], "smallest"),
        residual=True,
    )
    return peft_model


INIT = Init(
    name="milora",
    summary="minor r singular triplets as the adapter, principal part frozen (init=milora)",
    key="init",
    values=("milora",),
    build=_build,
    residual=True,
    base="float",
)
