"""Calibration statistics of linear-layer inputs: CorDA's covariance and ASVD's abs-mean.

CorDA (Yang et al., NeurIPS 2024, arXiv:2406.05223) orients the SVD of each weight by the
covariance of its input activations, C = sum over calibration samples of X_n^T X_n, where X_n is
the (tokens x d_in) input of sample n scaled by 1/s_n. ASVD (Yuan et al., 2023) needs only the
per-channel mean of |x| over tokens, summed over samples ("abs_mean").

What differs from the reference code (iboing/CorDA ``calib_cov_distribution``, peft
``preprocess_corda``), and why:
- Batches larger than one. Pad tokens (attention_mask == 0) never enter C, the scale s_n or the
  abs-mean, so a padded batch gives the same statistics as one sample at a time.
- One statistic per distinct layer input: modules fed the very same tensor (q/k/v, gate/up) share
  one accumulator. A one-token probe forward finds the groups (``input is input``).
- fp32 accumulation on the model's device. When the inputs are bf16/fp16 their values are exact
  in TF32, so on CUDA each sample's X^T X runs on TF32 tensor cores with an exact fp32 result
  up to summation order; ``C.addmm_(X.T, X, alpha=1/s^2)`` applies the scale in fp32.
- A memory plan: accumulators stay on the GPU while they fit in ``gpu_budget`` bytes (default:
  free memory less a reserve for activations), the rest (widest first, e.g. 14,336-wide
  down_proj inputs) live in pinned CPU memory and receive one GPU-computed partial sum per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class InputStats:
    """Statistics of one distinct layer input, shared by the modules in ``names``."""

    names: list[str]
    dim: int
    cov: torch.Tensor | None = None
    abs_mean: torch.Tensor | None = None
    samples: int = 0
    """Number of (sample, call) pairs seen: peft's ``sample_count`` with batch size 1."""
    extra: dict = field(default_factory=dict)


def find_shared_inputs(model: nn.Module, modules: dict[str, nn.Module], probe: dict) -> list[list[str]]:
    """Group target modules that receive the same input tensor, by one short probe forward."""
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def hook(name):
        def fn(module, args):
            x = args[0]
            for tensor, names in seen:
                if tensor is x:
                    names.append(name)
                    return
            seen.append((x, [name]))

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            _forward(model, probe)
    finally:
        for h in handles:
            h.remove()
    groups, grouped = [], set()
    for _, names in seen:
        names = list(dict.fromkeys(names))
        groups.append(names)
        grouped.update(names)
    groups += [[n] for n in modules if n not in grouped]  # never called in the probe
    return groups


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
"""What a calibration batch passes to the model: everything a training batch does but the labels
(BERT sentence pairs need their token_type_ids, or the second sentence runs as segment 0)."""


def _forward(model: nn.Module, batch: dict, last_logit_only: bool = False) -> None:
    device = next(model.parameters()).device
    kwargs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
    extra = {"use_cache": False}
    if last_logit_only:  # the output layer is no target: skip the (batch x tokens x vocab) logits
        extra["logits_to_keep"] = 1
    try:
        model(**kwargs, **extra)
    except TypeError:  # encoders take no use_cache / logits_to_keep
        model(**kwargs)


def _plan_devices(groups: list[InputStats], device: torch.device, where: str, gpu_budget: int | None) -> list[torch.device]:
    """Accumulator device per group: the model's device while they fit, CPU for the rest."""
    if device.type != "cuda" or where == "cpu":
        return [torch.device("cpu") if where == "cpu" else device for _ in groups]
    if where == "model":
        return [device for _ in groups]
    if gpu_budget is None:
        free, _ = torch.cuda.mem_get_info(device)
        gpu_budget = int(free * 0.9) - (4 << 30)
    out = [device] * len(groups)
    need = sum(g.dim * g.dim * 4 for g in groups)
    for i in sorted(range(len(groups)), key=lambda i: -groups[i].dim):
        if need <= gpu_budget:
            break
        out[i] = torch.device("cpu")
        need -= groups[i].dim ** 2 * 4
    return out


def collect_input_stats(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches,
    *,
    covariance: bool = True,
    abs_mean: bool = False,
    scaling: str = "signed_max",
    cov_dtype: str = "float32",
    accumulate_on: str = "auto",
    gpu_budget: int | None = None,
    progress: bool = True,
) -> list[InputStats]:
    """Run ``model`` over ``batches`` (dicts of input_ids, attention_mask and, where the task has
    them, token_type_ids / position_ids: ``MODEL_INPUTS``, as training passes them) and accumulate, per
    distinct input of the ``modules``, the scaled covariance sum and/or the abs-mean sum.

    ``scaling``: ``signed_max`` divides sample n by |max(X_n)| (official code and peft);
    ``abs_max`` by max|X_n|; ``none`` leaves X unscaled. ``cov_dtype``: ``float32``, or ``input``
    to accumulate in the activation dtype (peft's ``use_float16_for_covariance``).
    Sums are not normalised here; callers divide by a constant or by ``samples``.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch")
    first = batches[0]
    probe = {k: first[k][:1, :2] for k in MODEL_INPUTS if k in first}
    probe["attention_mask"] = torch.ones_like(probe["input_ids"])
    stats = [InputStats(names=g, dim=_in_features(modules[g[0]])) for g in find_shared_inputs(model, modules, probe)]
    device = next(model.parameters()).device
    homes = _plan_devices(stats, device, accumulate_on, gpu_budget)
    for st, home in zip(stats, homes):
        pin = home.type == "cpu" and device.type == "cuda"
        st.extra["home"] = home
        if covariance and cov_dtype == "float32":
            st.cov = torch.zeros(st.dim, st.dim, dtype=torch.float32, device=home, pin_memory=pin)
        if abs_mean:
            st.abs_mean = torch.zeros(st.dim, dtype=torch.float64, device=home)
    state = {"mask": None}

    def hook(st: InputStats):
        def fn(module, args):
            x = args[0].detach()
            mask = state["mask"]
            if x.dim() == 2 and mask.shape[0] == 1:
                x = x.unsqueeze(0)
            if x.shape[:-1] != mask.shape:
                x = x.reshape(*mask.shape, x.shape[-1])
            _accumulate(st, x, mask, state["info"], covariance, abs_mean, scaling, cov_dtype)

        return fn

    handles = [modules[st.names[0]].register_forward_pre_hook(hook(st)) for st in stats]
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    last_only = out_layer is not None and all(m is not out_layer for m in modules.values())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibration", disable=not progress):
                mask = batch.get("attention_mask")
                if mask is None:
                    mask = torch.ones_like(batch["input_ids"])
                state["mask"] = mask.to(device).bool()
                state["info"] = (state["mask"].all(1).tolist(), state["mask"].sum(1).tolist())
                _forward(model, {**batch, "attention_mask": mask}, last_only)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def _in_features(module: nn.Module) -> int:
    if hasattr(module, "in_features"):
        return module.in_features
    return module.weight.shape[0]  # transformers Conv1D stores (in, out)


def _sample_scales(x: torch.Tensor, mask: torch.Tensor, scaling: str) -> list[float | None]:
    """Per-sample divisor s_n over the sample's real tokens (one host sync per call)."""
    if scaling == "none":
        return [None] * x.shape[0]
    m = mask.unsqueeze(-1)
    if scaling == "signed_max":
        s = x.masked_fill(~m, float("-inf")).amax(dim=(1, 2)).float().abs()
    else:
        s = x.abs().masked_fill(~m, float("-inf")).amax(dim=(1, 2)).float()
    return s.tolist()


def _accumulate(st: InputStats, x: torch.Tensor, mask: torch.Tensor, info, covariance, abs_mean, scaling, cov_dtype):
    device = x.device
    half_in = x.dtype in (torch.float16, torch.bfloat16) and cov_dtype == "float32"
    partial = None
    if covariance and st.cov is None:  # cov_dtype "input": the activation dtype, as peft's fp16 option
        st.cov = torch.zeros(st.dim, st.dim, dtype=x.dtype, device=st.extra["home"])
    if covariance and st.cov.device != device:
        partial = torch.zeros(st.dim, st.dim, dtype=torch.float32, device=device)
    full, lengths = info
    scales = _sample_scales(x, mask, scaling) if covariance else [None] * x.shape[0]
    for n in range(x.shape[0]):
        if lengths[n] == 0:
            continue
        xn = x[n] if full[n] else x[n][mask[n]]
        st.samples += 1
        if abs_mean:
            st.abs_mean += xn.float().abs().mean(0).to(st.abs_mean)
        if not covariance:
            continue
        s = scales[n]
        if s is not None and (s != s or s in (0.0, float("inf"))):
            raise ValueError(f"invalid scale {s} for the input of {st.names[0]}: nan, inf or an all-zero sample")
        target = partial if partial is not None else st.cov
        if half_in:
            # bf16/fp16 values are exact in TF32: exact products, fp32 sums, 1/s^2 applied in fp32
            xf = xn.float()
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"
            try:
                target.addmm_(xf.t(), xf, alpha=1.0 if s is None else 1.0 / (s * s))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
            continue
        xn = xn.float() if cov_dtype == "float32" else xn
        if s is not None:
            xn = xn / torch.tensor(s, dtype=xn.dtype, device=device)
        target += xn.t().matmul(xn)
    if partial is not None:
        st.cov += partial.to(st.cov.device)
