"""ASVD: activation-aware SVD (Yuan et al., 2023, arXiv:2312.05821), CorDA's baseline in Fig. 2.

The input channels of W (out x in) are scaled by s = S^alpha + 1e-6 before the SVD, where S is
the per-channel mean |x| over tokens, summed over calibration samples ("abs_mean", the official
CorDA default ``--scaling_method abs_mean``) and alpha = 0.5 (CorDA's ``full_decompose`` value):
  U S' Vh = SVD(W diag(s)),  V = Vh^T / s[:, None],  so U S' V^T = W.
Truncating the smallest components of W diag(s) keeps the channels with large activations.
"""

from __future__ import annotations

import torch

ALPHA = 0.5


def act_scaling(abs_mean: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """Per-input-channel scale s = abs_mean^alpha + 1e-6 (fp32)."""
    return abs_mean.float().pow(alpha) + 1e-6


def asvd(weight: torch.Tensor, scale: torch.Tensor):
    """Full ASVD factors (U, S, V) of W with U diag(S) V^T = W."""
    w = weight.float()
    U, S, Vh = torch.linalg.svd(w * scale[None, :], full_matrices=False)
    V = Vh.t() / scale[:, None]
    return U, S, V
