"""The full-decompose study of CorDA (Fig. 2 / Table 6): perplexity when the r smallest
components of every linear layer (the output layer too) are discarded.

For each method the weight W of every nn.Linear is factored as U diag(S) V^T = W with
- ``cov-aware`` (CorDA's CO-SVD): SVD of W C_fix, V = (Vh C_fix^-1)^T (see corda.py),
- ``act-aware`` (ASVD): SVD of W diag(s), V = Vh^T / s, s = abs_mean^0.5 + 1e-6 (see asvd.py),
- ``plain``: SVD of W,
and replaced by U[:, :k] diag(S[:k]) V[:, :k]^T with k = min(out, in) - r. One calibration pass
collects both the covariances and the abs-means; a tied output layer is untied first so that the
input embeddings stay intact. WikiText-2 and PTB perplexity are measured per (method, r); the
paper's finding is that cov-aware degrades least. The study's files (written row by row, resumed
by a later run of the same settings) are study_report.py's; the run itself is build.run_study.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from loralab.decomposition.asvd import ALPHA, act_scaling
from loralab.decomposition.corda import damped_inverse
from loralab.decomposition.parallel import (
    collect_input_stats,  # data-parallel under torchrun, plain otherwise
)

METHODS = ("cov-aware", "act-aware", "plain")


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def corpus_tokens(tokenizer, corpora, data_dir=None, texts=None) -> dict[str, torch.Tensor]:
    """Each scored corpus (``tasks.corpora.load_corpus``, or its text in ``texts``) as one 1-D tensor of token
    ids, as ``perplexity`` windows it."""
    from loralab.tasks.perplexity import load_corpus

    texts = texts or {}
    return {name: tokenizer(texts[name] if name in texts else load_corpus(name, data_dir),
                            return_tensors="pt").input_ids[0] for name in corpora}


def untie_output(model: nn.Module) -> None:
    """Give the output layer its own weight so that changing it leaves the input embeddings alone."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and out.weight is inp.weight:
        out.weight = nn.Parameter(inp.weight.detach().clone())
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False


def calibrate(model: nn.Module, batches, progress: bool = True, names=None) -> dict[str, dict]:
    """Per-layer covariance (constant-256 normalisation, signed-max scaling) and abs-mean."""
    layers = {n: m for n, m in linear_layers(model).items() if names is None or n in names}
    stats = collect_input_stats(model, layers, batches, covariance=True, abs_mean=True, progress=progress)
    out = {}
    for st in stats:
        for name in st.names:
            out[name] = {"cov": st.cov / 256, "abs_mean": st.abs_mean}
    return out


def factor(weight: torch.Tensor, method: str, stat: dict | None, solver: str = "gram"):
    """Full (U, S, V), singular values descending, with U diag(S) V^T = W.

    The damping lambda is chosen exactly as the official code does (fp32 inverse, tolerance 0.05),
    but the factors are computed in fp64 with an fp64 inverse of that damped C: the official fp32
    inverse is only accepted to ||C C^-1 - I||_F < 0.05, so its U S V^T can miss W by percents and
    r = 0 would not reproduce the model."""
    w = weight.double()
    if method == "plain":
        m, right = w, None
    elif method == "act-aware":
        s = act_scaling(stat["abs_mean"], ALPHA).double()
        m, right = w * s[None, :], ("scale", s)
    elif method == "cov-aware":
        fixed, _, _ = damped_inverse(stat["cov"])
        fixed = fixed.double()
        m, right = w @ fixed, ("inv", torch.linalg.inv(fixed))
    else:
        raise ValueError(f"full-decompose method {method!r}; allowed: {', '.join(METHODS)}")
    if solver == "gram":
        from loralab.decomposition.corda import _gram_svd

        U, S, Vh = _gram_svd(m, min(m.shape), largest=True, out_dtype=torch.float64)
    else:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    if right is None:
        V = Vh.t()
    elif right[0] == "scale":
        V = Vh.t() / right[1][:, None]
    else:
        V = (Vh @ right[1]).t()
    return U.float(), S.float(), V.float()


def truncated(U, S, V, r: int) -> torch.Tensor:
    """U diag(S) V^T without its r smallest components."""
    k = max(S.numel() - r, 0)
    return (U[:, :k] * S[:k]) @ V[:, :k].t()


def full_decompose(model: nn.Module, stats: dict, method: str, rs: list[int], evaluate, *, solver: str = "gram",
                   names=None, progress: bool = True, on_result=None) -> dict[int, dict]:
    """For each r in ``rs``: discard the r smallest components of every linear layer (or of the
    layers in ``names``), call ``evaluate(model)`` (then ``on_result(r, result)`` if given: the
    study writes each row as it finishes), and restore the original weights at the end, also when
    interrupted."""
    layers = {n: m for n, m in linear_layers(model).items() if names is None or n in names}
    originals = {n: m.weight.data.clone() for n, m in layers.items()}
    factors = {}
    for name, module in tqdm(layers.items(), desc=f"decompose ({method})", disable=not progress):
        factors[name] = factor(module.weight.data, method, stats.get(name), solver)
    results = {}
    try:
        for r in rs:
            for name, module in layers.items():
                U, S, V = factors[name]
                module.weight.data = truncated(U, S, V, r).to(originals[name].dtype)
            results[r] = evaluate(model)
            if on_result is not None:
                on_result(r, results[r])
    finally:
        for name, module in layers.items():
            module.weight.data = originals[name]
    return results
