"""CorDA (Yang et al., NeurIPS 2024): context-oriented decomposition. With the covariance C = Σ XᵀX
of each layer's inputs on calibration data, W C = U S Vhᵀ and V = (Vh C⁻¹)ᵀ, so U S Vᵀ = W.
IPA (instruction-previewed, ``corda_method: "ipm"``) takes the largest r components as the adapter,
KPA (knowledge-preserved, ``"kpm"``) the smallest; the residual W − U_r S_r V_rᵀ is frozen, so the
model starts exactly at W.

adapter_config.json: ``init_lora_weights: "corda"`` + ``corda_config: {corda_method: ...}``.
Calibration (training_parameters ``calibration``): by default ``num_samples`` = 256 rows of the
task's train split, sampled at random (seed 000's README; ``sampling: "first"`` is what seed 000's
code did). peft's ``preprocess_corda`` computes the eigens (batch size 1, as peft requires), then
peft's own ``corda_init`` builds the adapter. Saved converted to a rank-2r LoRA as PiSSA.
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
    from peft.tuners.lora.corda import preprocess_corda

    samples = ctx.calibration_samples()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    @torch.no_grad()
    def run_model():
        for feat in samples:
            batch = {k: torch.tensor([v], device=device) for k, v in feat.items() if k != "labels"}
            model(**batch)

    preprocess_corda(model, cfg, run_model=run_model)
    model.train(was_training)
    peft_model = build_peft(model, cfg)
    return peft_model, ResidualSaver(peft_model)
