"""DoRA (Liu et al., 2024): W' = m · (W + sBA) / ||W + sBA||_row, magnitude m and direction B, A trained.

peft's ``use_dora`` layer is used (the norm is detached, as the paper's §4.3 and seed 002's
``dora_simple``). Seed 002's **magnitude-only modules** (``Wdecompose_target_modules``: only m
trains there) are listed in training_parameters ``magnitude_only_modules``: they are added to the
DoRA targets at rank 1 with A and B frozen and B = 0, so their forward is exactly
``(m / ||W||_row) · W x`` and only m moves, while the adapter stays a plain peft DoRA adapter.
"""

import copy

from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from loralab.methods.common import build_peft, check_ranks

NAME = "dora"
SUMMARY = "DoRA: magnitude x direction, m·(W+sBA)/||W+sBA|| (use_dora); magnitude-only modules supported"


def applies(cfg, params) -> bool:
    return cfg is not None and bool(getattr(cfg, "use_dora", False))


def _magnitude_only_names(model, cfg, params) -> list[str]:
    probe = copy.copy(cfg)
    probe.target_modules = set(params.magnitude_only_modules)
    probe.rank_pattern = {}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and check_target_module_exists(probe, n)]


def check(model, cfg, params) -> list[str]:
    problems = check_ranks(model, cfg)
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


def apply(model, cfg, params, ctx):
    mag_only = _magnitude_only_names(model, cfg, params) if params.magnitude_only_modules else []
    if mag_only:
        cfg = copy.deepcopy(cfg)
        cfg.target_modules = sorted(set(cfg.target_modules) | set(mag_only)) if not isinstance(cfg.target_modules, str) else cfg.target_modules
        cfg.rank_pattern = {**(cfg.rank_pattern or {}), **{f"^{n}$": 1 for n in mag_only}}
    peft_model = build_peft(model, cfg)
    if mag_only:
        import torch

        with torch.no_grad():
            for name, module in peft_model.named_modules():
                if any(name.endswith(n) for n in mag_only) and hasattr(module, "lora_B"):
                    module.lora_B["default"].weight.zero_()
                    module.lora_A["default"].weight.requires_grad_(False)
                    module.lora_B["default"].weight.requires_grad_(False)
    return peft_model, None
