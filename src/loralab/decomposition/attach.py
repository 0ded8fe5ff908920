"""``attach_corda_eigens``: a drop-in, batched replacement for peft's ``preprocess_corda``.

peft's ``preprocess_corda`` (peft 0.21) runs calibration one sample at a time, keeps one covariance
per target module (q/k/v hold three copies of the same matrix), and inverts each one. This
function computes the same eigens (CorDA, see corda.py) with padded batches, one covariance and
one damped inverse per distinct input, and a memory plan, then leaves the model in the state
``preprocess_corda`` leaves it: ``module.eigens = CordaEigens(S_WC, U_WC, V_WC)`` on every target
module (cropped to its rank: the first r for "ipm", the last r for "kpm"), no hooks, the model in
eval mode, and, with ``prune_temporary_fields=False``, the fields ``sample_count``,
``covariance_matrix``, ``corda_method`` and ``rank``. peft's ``cache_file`` and
``covariance_file`` are read and written in peft's own format. A following
``peft.get_peft_model(model, lora_config)`` then runs peft's ``corda_init``.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from tqdm.auto import tqdm

from loralab import distributed
from loralab.decomposition import cache
from loralab.decomposition.corda import (
    check_options,
    damped_inverse,
    decompose_weight,
    resolve_solver,
)
from loralab.decomposition.parallel import (
    collect_input_stats,  # data-parallel under torchrun, plain otherwise
)


def corda_targets(model: nn.Module, lora_config) -> dict[str, nn.Module]:
    """Target modules as peft's CorDA finds them: matched by the config, nn.Linear or Conv1D."""
    from peft.tuners.lora.model import LoraModel
    from transformers.pytorch_utils import Conv1D

    tm = lora_config.target_modules
    if tm is None or tm == "all-linear":
        raise ValueError(
            f"CorDA needs an explicit 'target_modules' list (got {tm!r}), e.g. "
            "['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']"
        )
    found = {
        name: module
        for name, module in model.named_modules()
        if LoraModel._check_target_module_exists(lora_config, name) and isinstance(module, (nn.Linear, Conv1D))
    }
    if not found:
        raise ValueError(f"no nn.Linear/Conv1D module matches target_modules={tm!r}")
    return found


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    from transformers.pytorch_utils import Conv1D

    w = module.weight.data
    return w.t() if isinstance(module, Conv1D) else w


def _rank(lora_config, name: str) -> int:
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(lora_config.rank_pattern.keys(), name)
    return lora_config.rank_pattern.get(key, lora_config.r)


def covariances(model, targets: dict[str, nn.Module], batches, opts: dict) -> list[tuple[list[str], torch.Tensor, int]]:
    """Normalised covariance per distinct input: (module names, C, samples). Cached if asked."""
    key = None
    if opts["cache_dir"] is not None:
        settings = {k: opts[k] for k in ("normalisation", "norm_constant", "scaling", "cov_dtype")}
        key = cache.make_key(
            "cov", cache.model_fingerprint(model, list(targets)), cache.batches_digest(batches), settings
        )
        hit = cache.load(opts["cache_dir"], "covariance", key, map_location=next(model.parameters()).device)
        if hit is not None:
            return hit
    stats = collect_input_stats(
        model, targets, batches, scaling=opts["scaling"], cov_dtype=opts["cov_dtype"],
        accumulate_on=opts["accumulate_on"], gpu_budget=opts["gpu_budget"], progress=opts["progress"],
    )
    out = []
    for st in stats:
        norm = opts["norm_constant"] if opts["normalisation"] == "constant" else st.samples
        st.cov /= norm
        out.append((st.names, st.cov, st.samples))
    if key is not None and distributed.is_main():  # one writer when several ranks calibrate
        cache.save(opts["cache_dir"], "covariance", key, out)
    return out


@torch.no_grad()
def attach_corda_eigens(model: nn.Module, lora_config, batches, *, options: dict | None = None) -> None:
    """Attach CorDA eigens to every target module of ``model``, as peft's ``preprocess_corda``.

    ``batches``: iterable of dicts with ``input_ids`` and ``attention_mask`` (any batch size,
    right or left padded) and whatever else training passes (``token_type_ids`` of sentence
    pairs; see ``covariance.MODEL_INPUTS``). ``options``: see ``loralab.decomposition.corda.DEFAULTS``; the defaults
    follow the official CorDA code (C / 256); pass ``{"normalisation": "count"}`` for peft's C / N.
    """
    CordaEigens = _eigens_class()
    opts = check_options(options)
    cc = lora_config.corda_config
    if cc is None:
        raise ValueError("lora_config.corda_config is None; set LoraConfig(corda_config=CordaConfig(...))")
    if opts["cov_dtype"] is None:
        opts["cov_dtype"] = "input" if cc.use_float16_for_covariance else "float32"
    targets = corda_targets(model, lora_config)
    device = next(model.parameters()).device

    if cc.cache_file is not None and os.path.exists(cc.cache_file) and os.path.getsize(cc.cache_file) > 0:
        saved = torch.load(cc.cache_file, map_location=device.type)
        for name, module in targets.items():
            module.eigens = CordaEigens(*(saved[f"{name}.eigens.{k}"] for k in ("S_WC", "U_WC", "V_WC")))
        return
    if cc.corda_method not in ("ipm", "kpm"):
        raise ValueError(f"corda_config.corda_method = {cc.corda_method!r}; allowed: 'ipm', 'kpm'")
    largest = cc.corda_method == "ipm"

    if cc.covariance_file is not None and os.path.exists(cc.covariance_file) and os.path.getsize(cc.covariance_file) > 0:
        saved = torch.load(cc.covariance_file, map_location=device.type)
        groups = [([name], saved[name], None) for name in targets]
        model.eval()
    else:
        batches = list(batches)
        groups = covariances(model, targets, batches, opts)
        model.eval()  # preprocess_corda leaves the hooked model in eval mode
        if cc.covariance_file is not None:
            os.makedirs(os.path.dirname(cc.covariance_file) or ".", exist_ok=True)
            torch.save({n: cov for names, cov, _ in groups for n in names}, cc.covariance_file)

    eig_key = None
    if opts["cache_dir"] is not None:
        eig_key = cache.make_key(
            "eigens", cache.model_fingerprint(model, list(targets)),
            [(names, cache.tensor_digest(cov, 1 << 16)) for names, cov, _ in groups],
            {n: _rank(lora_config, n) for n in targets}, cc.corda_method,
            {k: opts[k] for k in ("solver", "lowrank_oversample", "lowrank_niter", "seed", "damp", "damp_tol")},
        )
        hit = cache.load(opts["cache_dir"], "eigens", eig_key, map_location=device)
        if hit is not None:
            for name, module in targets.items():
                module.eigens = CordaEigens(*hit[name])
            _finish(targets, lora_config, groups, cc)
            return

    result = {}
    keep_cov = not cc.prune_temporary_fields
    for i in tqdm(range(len(groups)), desc="CorDA decomposition", disable=not opts["progress"]):
        names, cov, samples = groups[i]
        if not keep_cov:
            groups[i] = (names, None, samples)  # free each covariance once used: lower peak memory
        fixed, inv, _ = damped_inverse(cov.to(device), opts["damp"], opts["damp_tol"])
        del cov
        for name in names:
            module = targets[name]
            w = _weight_out_in(module).to(device)
            solver = resolve_solver(opts["solver"], device, largest)
            d = decompose_weight(
                w, fixed, inv, _rank(lora_config, name), largest, solver,
                oversample=opts["lowrank_oversample"], niter=opts["lowrank_niter"], seed=opts["seed"],
            )
            wdev = module.weight.device
            module.eigens = CordaEigens(S_WC=d.S.to(wdev), U_WC=d.U.to(wdev), V_WC=d.V.to(wdev))
            result[name] = (module.eigens.S_WC, module.eigens.U_WC, module.eigens.V_WC)
        del fixed, inv
    if eig_key is not None:
        if distributed.is_main():
            cache.save(opts["cache_dir"], "eigens", eig_key, result)
    _finish(targets, lora_config, groups, cc)


def _eigens_class():
    """peft's CordaEigens; its module imports the ``attrs`` package, so fall back to an equal record."""
    try:
        from peft.tuners.lora.corda import CordaEigens
    except ImportError:
        from dataclasses import dataclass

        @dataclass
        class CordaEigens:
            S_WC: torch.Tensor
            U_WC: torch.Tensor
            V_WC: torch.Tensor

    return CordaEigens


def _finish(targets, lora_config, groups, cc) -> None:
    if not cc.prune_temporary_fields:
        for names, cov, samples in groups:
            for name in names:
                m = targets[name]
                m.covariance_matrix, m.sample_count = cov, samples
                m.corda_method, m.rank = cc.corda_method, _rank(lora_config, name)
    if cc.cache_file is not None:
        saved = {}
        for name, m in targets.items():
            for k in ("S_WC", "U_WC", "V_WC"):
                saved[f"{name}.eigens.{k}"] = getattr(m.eigens, k)
        os.makedirs(os.path.dirname(cc.cache_file) or ".", exist_ok=True)
        torch.save(saved, cc.cache_file)
