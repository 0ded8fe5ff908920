"""CorDA (Yang et al., NeurIPS 2024): context-oriented decomposition. With the covariance C = Σ XᵀX
of each layer's inputs on calibration data, W C = U S Vhᵀ and V = (Vh C⁻¹)ᵀ, so U S Vᵀ = W.
IPA (instruction-previewed, ``corda_method: "ipm"``) takes the largest r components as the adapter,
KPA (knowledge-preserved, ``"kpm"``) the smallest; the residual W − U_r S_r V_rᵀ is frozen, so the
model starts exactly at W.

adapter_config.json: ``init_lora_weights: "corda"`` + ``corda_config: {corda_method: ...}``.
Calibration (training_parameters ``calibration``): by default ``num_samples`` = 256 rows of the
task's train split, sampled at random (seed 000's README; ``sampling: "first"`` is what seed 000's
code did), or a named calibration set (``calibration.dataset``: nqopen, metamath, alpaca, ...).
``loralab.decomposition.attach_corda_eigens`` computes the eigens from padded batches (pads never
enter C; peft's ``preprocess_corda`` needs batch size 1) and leaves the model exactly as peft's
preprocessing would, so peft's own ``corda_init`` builds the adapter. ``calibration.corda_options``
holds the options where the sources disagree (normalisation, scaling, cov dtype; defaults = the
official code). Saved converted to a rank-2r LoRA as PiSSA.
"""

import torch

from loralab.methods.common import ResidualSaver, build_peft, check_ranks

NAME = "corda"
SUMMARY = "CorDA: covariance-oriented SVD, IPA = largest r / KPA = smallest r, residual frozen (init_lora_weights=corda)"


def applies(cfg, params) -> bool:
    return cfg is not None and str(cfg.init_lora_weights).lower() == "corda"


def check(model, cfg, params) -> list[str]:
    problems = check_ranks(model, cfg)
    if cfg.corda_config is None:
        problems.append("adapter_config.json sets init_lora_weights='corda' but no 'corda_config' ({corda_method: ipm|kpm})")
    return problems


def apply(model, cfg, params, ctx):
    from loralab.decomposition import attach_corda_eigens
    from loralab.decomposition.calibration import make_batches

    samples = [torch.tensor(f["input_ids"]) for f in ctx.calibration_samples()]
    pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
    batches = make_batches(samples, params.calibration["batch_size"], pad_id)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    was_training = model.training
    attach_corda_eigens(model, cfg, batches, options=params.calibration["corda_options"])
    model.train(was_training)
    peft_model = build_peft(model, cfg)
    return peft_model, ResidualSaver(peft_model)
