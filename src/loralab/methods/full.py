"""Full fine-tuning: no adapter file in the experiment; every parameter trains (seed 000's baseline).

Not composed of parts: there is no adapter layer, so no adapter init or adapter optimizer applies.
"""

NAME = "full"
SUMMARY = "full fine-tuning (no adapter_config.json): every weight trains"


def apply(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model
