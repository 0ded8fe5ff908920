"""EVA (Paischer et al., 2024, "One Initialization to Rule them All: Fine-tuning via Explained
Variance Adaptation", arXiv:2410.07170): A = the top right-singular vectors of each layer's input
activations on calibration data (incremental SVD until the components' cosine similarity between
steps exceeds ``tau``), B = 0; with ``rho`` > 1 the rank budget r·(number of layers) is
redistributed across layers by explained variance (each layer between 0 and rho·r). W is not
changed, so the model starts exactly at W.

An init variation through peft's implementation: ``init_lora_weights: "eva"`` with
``eva_config`` ({rho, tau, whiten, ...}) in adapter_config.json; peft's
``initialize_lora_eva_weights`` runs over ``MethodContext.calibration_batches``, the same
calibration settings (training_parameters ``calibration``) and the same batches as CorDA, labels
left out (sequence labels are not token masks). The adapter is a plain peft LoRA (its
``rank_pattern`` records the redistributed ranks). Shares the LoRA layer and every optimizer.
"""

from loralab.methods.common import build_peft
from loralab.methods.parts import Init


def _check(model, cfg, params) -> list[str]:
    if cfg.eva_config is None:
        return ["adapter_config.json sets init_lora_weights='eva' but no 'eva_config' (e.g. {\"rho\": 2.0})"]
    return []


def _build(model, cfg, params, ctx):
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    batches = ctx.calibration_batches(device=next(model.parameters()).device)
    peft_model = build_peft(model, cfg)
    was_training = peft_model.training
    initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=False)
    peft_model.train(was_training)
    return peft_model


INIT = Init(
    name="eva",
    summary="A = top singular vectors of layer inputs on calibration data, B = 0, ranks redistributed (peft init_lora_weights=eva)",
    key="init_lora_weights",
    values=("eva",),
    build=_build,
    check=_check,
    data_driven=True,
)
