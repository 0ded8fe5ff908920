"""``loralab decompose`` end to end: the capabilities of CorDA's ``build_corda.py``.

``build_adapter``: calibration set -> covariances -> CorDA eigens (attach_corda_eigens) ->
peft's corda_init -> ``save_path`` holds the residual model (a plain transformers checkpoint)
and ``save_path/adapter`` the initial adapter in peft format (init_lora_weights reset to True, as
peft's CorDA example does, so that loading it never re-runs the init). Loading the adapter on
the residual model reproduces the original model; ``loralab run`` can train from it.
``run_study``: the full-decompose perplexity study (study.py) with its report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from loralab.decomposition import cache
from loralab.decomposition.calibration import calibration_samples, make_batches

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def calibration_batches(model_path: str, tokenizer, name: str, size: int, seed: int, seqlen: int, batch_size: int,
                        data_dir=None, fmt="llama2-chat", sampling="random", use_cache=False, cache_dir=None):
    """Calibration batches (cached on disk under ``use_cache``, keyed by tokenizer + settings)."""
    spec = {"name": name, "size": size, "seed": seed, "seqlen": seqlen, "fmt": fmt, "sampling": sampling,
            "data_dir": str(data_dir), "tokenizer": str(model_path), "vocab": len(tokenizer)}
    key = cache.make_key("calib", spec)
    cache_dir = cache_dir or cache.default_cache_dir()
    hit = cache.load(cache_dir, "calibration", key) if use_cache else None
    if hit is None:
        samples, provenance = calibration_samples(name, tokenizer, size, seed=seed, seqlen=seqlen, data_dir=data_dir,
                                                  fmt=fmt, sampling=sampling)
        hit = {"samples": samples, "provenance": provenance}
        if use_cache:
            cache.save(cache_dir, "calibration", key, hit)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return make_batches(hit["samples"], batch_size, pad), hit["provenance"]


def _load(model_id: str, dtype: str, device: str):
    from loralab.models import load_model, load_tokenizer, resolve_model_path

    model = load_model(model_id, "causal_lm", dtype=dtype).to(device)
    return model, load_tokenizer(model_id), resolve_model_path(model_id)


def build_adapter(model_id: str, r: int, *, mode: str = "kpa", calib_dataset: str = "nqopen", calib_size: int = 256,
                  seed: int = 233, seqlen: int = 2048, batch_size: int = 8, save_path=None, use_cache=False,
                  target_modules=None, data_dir=None, fmt="llama2-chat", sampling="random", dtype="float32",
                  device="cpu", options=None) -> dict:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig

    from loralab.decomposition.attach import attach_corda_eigens

    torch.manual_seed(seed)
    start = time.time()
    model, tokenizer, path = _load(model_id, dtype, device)
    batches, provenance = calibration_batches(path, tokenizer, calib_dataset, calib_size, seed, seqlen, batch_size,
                                              data_dir, fmt, sampling, use_cache)
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=list(target_modules or PROJECTIONS),
                        init_lora_weights="corda", task_type="CAUSAL_LM",
                        corda_config=CordaConfig(corda_method="ipm" if mode == "ipa" else "kpm"))
    options = dict(options or {})
    if use_cache:
        options.setdefault("cache_dir", str(cache.default_cache_dir()))
    attach_corda_eigens(model, config, batches, options=options)
    peft_model = get_peft_model(model, config)
    info = {"model_id": model_id, "r": r, "mode": mode, "calibration": provenance, "options": options,
            "seconds": round(time.time() - start, 1)}
    if save_path is not None:
        out = Path(save_path)
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(out / "adapter")
        residual = peft_model.unload()
        residual.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "decompose.json").write_text(json.dumps(info, indent=2, default=str))
        info["save_path"] = str(out)
    return info


def run_study(model_id: str, rs: list[int], methods: list[str], *, calib_dataset: str = "alpaca",
              calib_size: int = 256, seed: int = 233, calib_seqlen: int = 2048, batch_size: int = 8,
              seq_len: int = 2048, max_windows=None, corpora=("wikitext2", "ptb"), data_dir=None, out_dir=None,
              use_cache=False, dtype="float32", device="cpu", fmt="llama2-chat", solver="gram") -> list[dict]:
    """Base perplexity plus one row per (method, r); written to ``out_dir`` if given."""
    from loralab.decomposition.study import (
        calibrate,
        full_decompose,
        untie_output,
        write_report,
    )
    from loralab.tasks.metrics import settle
    from loralab.tasks.perplexity import load_corpus, perplexity

    model, tokenizer, path = _load(model_id, dtype, device)
    untie_output(model)
    texts = {c: tokenizer(load_corpus(c, data_dir), return_tensors="pt").input_ids[0] for c in corpora}

    def evaluate(m):
        # an overflowing perplexity (a rank that destroys the model) is recorded by the degenerate rule
        return settle({c: perplexity(m, tokenizer, texts[c], seq_len=seq_len, max_windows=max_windows) for c in corpora})

    batches, provenance = calibration_batches(path, tokenizer, calib_dataset, calib_size, seed, calib_seqlen,
                                              batch_size, data_dir, fmt, "random", use_cache)
    stats = calibrate(model, batches)
    rows = [{"method": "base", "r": 0, **evaluate(model)}]
    print(rows[-1], flush=True)
    for method in methods:
        for r, ppl in full_decompose(model, stats, method, [r for r in rs if r > 0], evaluate, solver=solver).items():
            rows.append({"method": method, "r": r, **ppl})
            print(rows[-1], flush=True)
    if out_dir is not None:
        meta = {"model_id": model_id, "calibration": provenance, "seq_len": seq_len, "max_windows": max_windows,
                "corpora": list(corpora), "solver": solver, "dtype": dtype}
        print(write_report(rows, list(corpora), out_dir, meta))
    return rows
