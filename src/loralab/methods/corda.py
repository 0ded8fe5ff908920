"""CorDA (Yang et al., NeurIPS 2024): context-oriented decomposition. With the covariance C = Σ XᵀX
of each layer's inputs on calibration data, W C = U S Vhᵀ and V = (Vh C⁻¹)ᵀ, so U S Vᵀ = W.
IPA (instruction-previewed, ``corda_method: "ipm"``) takes the largest r components as the adapter,
KPA (knowledge-preserved, ``"kpm"``) the smallest; the residual W − U_r S_r V_rᵀ is frozen, so the
model starts exactly at W.

An init variation: ``init_lora_weights: "corda"`` + ``corda_config: {corda_method: ...}``.
Calibration (training_parameters ``calibration``): by default ``num_samples`` = 256 rows of the
task's train split, sampled at random (seed 000's README; ``sampling: "first"`` is what seed 000's
code did), or a named calibration set (``calibration.dataset``: nqopen, metamath, alpaca, ...);
batched by ``MethodContext.calibration_batches``, exactly as training batches them
(token_type_ids of sentence pairs included). ``loralab.decomposition.attach_corda_eigens``
computes the eigens from padded batches (pads never enter C; peft's ``preprocess_corda`` needs
batch size 1) and leaves the model exactly as peft's preprocessing would, so peft's own
``corda_init`` builds the adapter. ``calibration.corda_options`` holds the options where the
sources disagree (normalisation, scaling, cov dtype; defaults = the official code). Saved
converted to a rank-2r LoRA as PiSSA. Shares the LoRA layer and every optimizer.
"""

from loralab.methods.common import build_peft
from loralab.methods.parts import Init


def _check(model, cfg, params) -> list[str]:
    if cfg.corda_config is None:
        return ["adapter_config.json sets init_lora_weights='corda' but no 'corda_config' ({corda_method: ipm|kpm})"]
    return []


def _build(model, cfg, params, ctx):
    from loralab.decomposition import attach_corda_eigens

    batches = ctx.calibration_batches(device=next(model.parameters()).device)
    was_training = model.training
    attach_corda_eigens(model, cfg, batches, options=params.calibration["corda_options"])
    model.train(was_training)
    return build_peft(model, cfg)


def _variant(cfg, params) -> str:
    method = getattr(cfg.corda_config, "corda_method", None) if cfg.corda_config is not None else None
    return {"ipm": "corda_ipa", "kpm": "corda_kpa"}.get(method, "corda")


INIT = Init(
    name="corda",
    summary="covariance-oriented SVD, IPA = largest r / KPA = smallest r, residual frozen (init_lora_weights=corda)",
    key="init_lora_weights",
    values=("corda",),
    build=_build,
    check=_check,
    residual=True,
    base="float",
    data_driven=True,
    variant=_variant,
)
