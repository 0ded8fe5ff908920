"""LoRA-GA (Wang et al., NeurIPS 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
arXiv:2407.05000): the first step of LoRA should match the first step of full fine-tuning. With
G = the average gradient of the loss w.r.t. W on calibration batches and G ≈ U S Vᵀ, A = V[:, :r]ᵀ
and B = U[:, r:2r]·S·γ (``direction: "ArB2r"``, ``scale: "stable"``, γ = out^¼/√stable_gamma);
the base weight becomes W − s·B·A, so the model starts exactly at W.

An init variation through peft's implementation (peft 0.21: ``preprocess_loraga`` then
``init_lora_weights: "lora_ga"`` with ``lora_ga_config``): the gradient is estimated over
``MethodContext.calibration_batches(labels=True)`` (the same calibration settings as CorDA and EVA,
with the training labels, since LoRA-GA needs the loss), one forward/backward per batch, and
averaged over batches. Saved converted to a rank-2r LoRA as PiSSA (the base weight changed).
Shares the LoRA layer and every optimizer.
"""

from loralab.methods.common import build_peft
from loralab.methods.parts import Init


def _check(model, cfg, params) -> list[str]:
    if cfg.lora_ga_config is None:
        return ["adapter_config.json sets init_lora_weights='lora_ga' but no 'lora_ga_config' (e.g. {\"direction\": \"ArB2r\"})"]
    return []


def _build(model, cfg, params, ctx):
    from peft.tuners.lora.loraga import preprocess_loraga

    batches = ctx.calibration_batches(device=next(model.parameters()).device, labels=True)

    def train_step():
        for batch in batches:
            model(**batch).loss.backward()

    was_training = model.training
    preprocess_loraga(model, cfg, train_step)
    model.train(was_training)
    return build_peft(model, cfg)


INIT = Init(
    name="lora_ga",
    summary="SVD of the full fine-tuning gradient on calibration batches, residual frozen (peft init_lora_weights=lora_ga)",
    key="init_lora_weights",
    values=("lora_ga",),
    build=_build,
    check=_check,
    residual=True,
    base="float",
    data_driven=True,
)
