"""Full fine-tuning: no adapter file in the experiment; every parameter trains (seed 000's baseline)."""

NAME = "full"
SUMMARY = "full fine-tuning (no adapter_config.json): every weight trains"


def applies(cfg, params) -> bool:
    return cfg is None


def check(model, cfg, params) -> list[str]:
    return []


def apply(model, cfg, params, ctx):
    for p in model.parameters():
        p.requires_grad_(True)
    return model, None
