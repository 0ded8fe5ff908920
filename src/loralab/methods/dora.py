"""DoRA (Liu et al., 2024): W' = m · (W + sBA) / ||W + sBA||_row, magnitude m and direction B, A trained.

A layer variation of LoRA (``use_dora: true``): peft's DoRA layer is used (the norm is detached,
as the paper's §4.3 and seed 002's ``dora_simple``); its faster, numerically equal forward is
``loralab.speed.fast_dora`` (``speed.fast_dora``, applied by the training step), which keeps the
adapter a plain peft DoRA adapter.

Seed 002's **magnitude-only modules** (``Wdecompose_target_modules``: only m trains there) are the
``dora_magnitude_only`` layer, selected by training_parameters ``magnitude_only_modules``: they are
added to the DoRA targets at rank 1 with A and B frozen and B = 0, so their forward is exactly
``(m / ||W||_row) · W x`` and only m moves, while the adapter stays a plain peft DoRA adapter.

Refused combinations (the registry turns these into config errors naming both keys):
- the LoRA-FA optimizer: its projected gradient (A Aᵀ)⁻¹/s² is derived for ΔW = s·B·A, not for
  DoRA's normalised direction;
- seed 003's LoRA-FA inits (``svd_lorafa`` as written starts off W, which the magnitude would
  absorb; the family is defined on LoRA);
- with magnitude-only modules, every init but the default (an init rewrites the rank-1 frozen
  factors of those modules, so they would no longer be magnitude-only) and LoRA+ (its B group
  is frozen there).
"""

import copy

from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from loralab.methods.common import check_ranks
from loralab.methods.parts import Layer
from loralab.speed.fast_dora import enable_fast_dora as fast_forward  # noqa: F401  DoRA's equal, faster forward (speed.fast_dora)

_LORAFA = "LoRA-FA's projected gradient (A Aᵀ)⁻¹/s² is derived for ΔW = s·B·A, not for DoRA's normalised direction"
_FA_INIT = "seed 003's LoRA-FA inits are defined on the LoRA layer"


def _magnitude_only_names(model, cfg, params) -> list[str]:
    probe = copy.copy(cfg)
    probe.target_modules = set(params.magnitude_only_modules)
    probe.rank_pattern = {}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and check_target_module_exists(probe, n)]


def _check(model, cfg, params) -> list[str]:
    problems = check_ranks(model, cfg)
    if getattr(cfg, "use_rslora", False):
        problems.append(
            "adapter_config.json 'use_rslora' = true with 'use_dora' = true: rsLoRA scaling under DoRA is not "
            "in the test matrix; use one of them"
        )
    if params.magnitude_only_modules:
        names = _magnitude_only_names(model, cfg, params)
        if not names:
            problems.append(
                f"'magnitude_only_modules' = {params.magnitude_only_modules!r} matches no nn.Linear of the model"
            )
        overlap = [n for n in names if check_target_module_exists(cfg, n)]
        if overlap:
            problems.append(
                f"'magnitude_only_modules' overlaps adapter target_modules at {overlap[0]} (a module is either full DoRA or magnitude-only)"
            )
    return problems


def _configure(model, cfg, params):
    if not params.magnitude_only_modules:
        return cfg
    mag_only = _magnitude_only_names(model, cfg, params)
    cfg = copy.deepcopy(cfg)
    if not isinstance(cfg.target_modules, str):
        cfg.target_modules = sorted(set(cfg.target_modules) | set(mag_only))
    cfg.rank_pattern = {**(cfg.rank_pattern or {}), **{f"^{n}$": 1 for n in mag_only}}
    cfg.loralab_magnitude_only = mag_only  # read back by _finish on the built model
    return cfg


def _finish(peft_model, cfg, params):
    import torch

    mag_only = getattr(cfg, "loralab_magnitude_only", [])
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if any(name.endswith(n) for n in mag_only) and hasattr(module, "lora_B"):
                module.lora_B["default"].weight.zero_()
                module.lora_A["default"].weight.requires_grad_(False)
                module.lora_B["default"].weight.requires_grad_(False)


LAYER = Layer(
    name="dora",
    summary="DoRA: m·(W+sBA)/||W+sBA|| (use_dora); forward sped up by speed.fast_dora",
    selects=lambda cfg, params: bool(getattr(cfg, "use_dora", False)) and not params.magnitude_only_modules,
    keys="adapter_config.json 'use_dora'",
    check=_check,
    refuses={"optimizer:lorafa": _LORAFA, "init:svd_lorafa": _FA_INIT, "init:svd_lorafa_corrected": _FA_INIT, "init:lorafa_qr": _FA_INIT},
    trainable="r·(in+out) + out per layer",
)

_MAG = "magnitude-only modules are DoRA at rank 1 with frozen zero factors; this part would change them"
MAGNITUDE_ONLY = Layer(
    name="dora_magnitude_only",
    summary="DoRA plus seed 002's magnitude-only modules (use_dora + magnitude_only_modules): only m trains there",
    selects=lambda cfg, params: bool(getattr(cfg, "use_dora", False)) and bool(params.magnitude_only_modules),
    keys="'magnitude_only_modules'",
    check=_check,
    configure=_configure,
    finish=_finish,
    refuses={"optimizer:lorafa": _LORAFA, "optimizer:loraplus": _MAG, "init:*": _MAG},
    trainable="r·(in+out) + out per DoRA layer, out per magnitude-only module",
)
