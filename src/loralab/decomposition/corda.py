"""CorDA: context-oriented decomposition (Yang et al., NeurIPS 2024, arXiv:2406.05223).

For a weight W (out x in) and the covariance C of its inputs over calibration data:
  C_fix = C + lambda * mean(diag C) * I, lambda = 0.01 doubled until ||C_fix C_fix^-1 - I||_F < 0.05
  U S Vh = SVD(W C_fix),  V = (Vh C_fix^-1)^T,  so that U S V^T = W.
KPA (knowledge-preserved, peft "kpm") makes the r smallest components the adapter, IPA
(instruction-previewed, "ipm") the r largest; the residual W - U_r S_r V_r^T stays frozen, so the
model starts unchanged. peft's ``corda_init`` turns the attached eigens into lora_A = sqrt(S/s) V^T,
lora_B = U sqrt(S/s) (s = lora scaling) and writes the residual; we only replace the slow part,
``preprocess_corda`` (see ``attach_corda_eigens``), and leave the model in exactly its state.

Options where the sources disagree (defaults follow the official iboing/CorDA code):
- ``normalisation``: ``constant`` (C / 256, official) or ``count`` (C / number of samples, peft).
- ``scaling``: per-sample divisor ``signed_max`` (|max X|, both codes) or ``abs_max`` (max |X|).
- ``cov_dtype``: ``float32`` (official) or ``input`` (peft's use_float16_for_covariance).
Engine options (no effect on the maths beyond rounding):
- ``solver``: ``svd`` (torch.linalg.svd, as peft), ``gram`` (eigh of the fp64 Gram matrix of W C,
  fast on GPUs and accurate for the smallest components), ``lowrank`` (randomized range finder
  with power iterations, IPA only: the top r; fastest, but on flat spectra its top-r subspace is
  approximate), ``auto`` (svd on CPU, as peft; gram on CUDA: on an H100 it matched peft's IPA
  eigens to 4e-3 relative and met the 5x goal, see results/corda/README.md).
- ``accumulate_on`` / ``gpu_budget``: the covariance memory plan (see covariance.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULTS = {
    "normalisation": "constant",  # official: C / 256; "count": peft, C / number of samples
    "norm_constant": 256,
    "scaling": "signed_max",  # official and peft: X / |max(X)| per sample
    "cov_dtype": None,  # None: lora_config.corda_config.use_float16_for_covariance -> "input", else "float32"
    "solver": "auto",
    "lowrank_oversample": None,  # None: r extra columns
    "lowrank_niter": 8,
    "seed": 0,  # randomized solver only
    "damp": 0.01,
    "damp_tol": 0.05,
    "accumulate_on": "auto",  # "auto" | "model" | "cpu"
    "gpu_budget": None,  # bytes for covariance accumulators on the GPU; None: free memory - 4 GiB
    "cache_dir": None,  # covariance + eigens cache (see cache.py); None: no cache
    "progress": True,
}
CHOICES = {
    "normalisation": ("constant", "count"),
    "scaling": ("signed_max", "abs_max", "none"),
    "cov_dtype": (None, "float32", "input"),
    "solver": ("auto", "svd", "gram", "lowrank"),
    "accumulate_on": ("auto", "model", "cpu"),
}


def check_options(options: dict | None) -> dict:
    """Defaults merged with ``options``; every unknown key or bad value reported at once."""
    import difflib

    options = dict(options or {})
    problems = []
    for key, value in options.items():
        if key not in DEFAULTS:
            close = difflib.get_close_matches(key, DEFAULTS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"CorDA option {key!r} is unknown{hint}; known: {', '.join(DEFAULTS)}")
        elif key in CHOICES and value not in CHOICES[key]:
            problems.append(f"CorDA option {key!r} = {value!r}; allowed: {', '.join(map(repr, CHOICES[key]))}")
    if problems:
        raise ValueError("\n".join(problems))
    return {**DEFAULTS, **options}


def damped_inverse(cov: torch.Tensor, damp: float = 0.01, tol: float = 0.05) -> tuple[torch.Tensor, torch.Tensor, float]:
    """C + lambda*mean(diag C)*I and its inverse, lambda doubled until the inverse is accurate."""
    cov = cov.float()
    eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
    mean_diag = torch.mean(torch.diag(cov))
    for _ in range(64):
        fixed = cov + eye * (mean_diag * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < tol:
            return fixed, inv, damp
        damp *= 2
    raise ValueError("damped inverse did not converge: the covariance has nan/inf entries")


@dataclass
class Decomposition:
    """U (out x k), S (k), V (in x k) with U diag(S) V^T the chosen components of W."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


def _pick(k: int, r: int, largest: bool) -> slice:
    return slice(0, r) if largest else slice(k - r, k)


def decompose_weight(
    weight: torch.Tensor, fixed: torch.Tensor, inv: torch.Tensor, r: int | None, largest: bool, solver: str = "svd",
    *, oversample: int | None = None, niter: int = 8, seed: int = 0,
) -> Decomposition:
    """The r largest (IPA) or smallest (KPA) components of W C_fix, right factor times C_fix^-1.
    ``r=None`` keeps all components (svd and gram solvers)."""
    w = weight.float()
    m = w @ fixed
    k = min(m.shape)
    r = k if r is None else min(r, k)
    if solver == "svd":
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        sl = _pick(k, r, largest)
        U, S, Vh = U[:, sl], S[sl], Vh[sl]
    elif solver == "gram":
        U, S, Vh = _gram_svd(m, r, largest)
    elif solver == "lowrank":
        if not largest:
            raise ValueError("solver 'lowrank' finds the largest components only (IPA); use 'svd' or 'gram' for KPA")
        U, S, Vh = _randomized_svd(m, r, oversample if oversample is not None else r, niter, seed)
    else:
        raise ValueError(f"unknown solver {solver!r}; allowed: svd, gram, lowrank")
    V = (Vh @ inv).t()
    for name, t in (("U", U), ("S", S), ("V", V)):
        if not torch.isfinite(t).all():
            raise ValueError(f"invalid value (nan/inf) in CorDA factor {name}")
    return Decomposition(U.contiguous(), S.contiguous(), V.contiguous())


def _gram_svd(m: torch.Tensor, r: int, largest: bool, out_dtype=torch.float32):
    """SVD components of m through eigh of its fp64 Gram matrix on the shorter side."""
    md = m.double()
    k = min(m.shape)
    sl = _pick(k, r, largest)
    if m.shape[0] <= m.shape[1]:
        evals, evecs = torch.linalg.eigh(md @ md.t())
        evals, evecs = evals.flip(0)[sl], evecs.flip(1)[:, sl]
        S = evals.clamp_min(0).sqrt()
        U = evecs
        Vh = (U.t() @ md) / S.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    else:
        evals, evecs = torch.linalg.eigh(md.t() @ md)
        evals, evecs = evals.flip(0)[sl], evecs.flip(1)[:, sl]
        S = evals.clamp_min(0).sqrt()
        Vh = evecs.t()
        U = (md @ evecs) / S.clamp_min(torch.finfo(torch.float64).tiny)[None, :]
    return U.to(out_dtype), S.to(out_dtype), Vh.to(out_dtype)


def _randomized_svd(m: torch.Tensor, r: int, oversample: int, niter: int, seed: int):
    """Halko-Martinsson-Tropp range finder with QR-stabilised power iterations; the top r."""
    gen = torch.Generator(device=m.device).manual_seed(seed)
    q = min(r + oversample, min(m.shape))
    omega = torch.randn(m.shape[1], q, device=m.device, dtype=m.dtype, generator=gen)
    Q = torch.linalg.qr(m @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(m.t() @ Q).Q
        Q = torch.linalg.qr(m @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.t() @ m, full_matrices=False)
    return (Q @ Ub)[:, :r], S[:r], Vh[:r]


def resolve_solver(solver: str, device: torch.device, largest: bool) -> str:
    if solver != "auto":
        return solver
    return "svd" if device.type != "cuda" else "gram"
