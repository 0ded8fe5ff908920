"""``loralab decompose`` end to end: the capabilities of CorDA's ``build_corda.py``.

``build_adapter``: calibration set -> covariances -> CorDA eigens (attach_corda_eigens) ->
peft's corda_init -> ``save_path`` holds the residual model (a plain transformers checkpoint,
with ``decompose.json``: ``RESIDUAL_MARKER``) and ``save_path/adapter`` the initial adapter in
peft format (init_lora_weights reset to True, as peft's CorDA example does, so that loading it
never re-runs the init). peft's example leaves the original model's id in the adapter's
``base_model_name_or_path`` (its training script loads the residual model by hand); here the
adapter names the residual folder (absolute path), the model it belongs to, so plain
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_name_or_path), adapter)``,
``loralab merge`` and ``loralab eval --adapter`` without ``--base``/``--model`` reproduce the
original model. ``run_study``: the full-decompose perplexity study (study.py), written row by
row and resumed (study_report.py). Both check every argument (arguments.py) and what the model's config
shows (checks.model_problems: the target names and the rank against each targeted layer, the calibration
length against the trained positions; the study's --r against every layer), and the study its windows against
the tokenized corpora, before any weights load.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from loralab import distributed
from loralab.config import ConfigError
from loralab.decomposition import cache
from loralab.decomposition.arguments import argument_problems, rank_problems, window_problems
from loralab.decomposition.calibration import calibration_samples, canonical_name, make_batches, source_of
from loralab.decomposition.checks import model_problems, study_warnings
from loralab.decomposition.overlap import (
    EVAL_FILES,
    eval_file,
    evaluation_overlap,
    overlap_note,
    overlap_provenance,
    warn_overlap,
)
from loralab.decomposition.residual import RESIDUAL_MARKER  # noqa: F401 - read here by older callers
from loralab.decomposition.study_report import row_line

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems, "loralab decompose")


def say(text: str) -> None:
    if distributed.is_main():
        print(text, flush=True)


def calibration_batches(model_path: str, tokenizer, name: str, size: int, seed: int, seqlen: int, batch_size: int,
                        data_dir=None, fmt="llama2-chat", sampling="random", use_cache=False, cache_dir=None):
    """Calibration batches (cached on disk under ``use_cache``, keyed by tokenizer + settings)."""
    spec = {"name": name, "size": size, "seed": seed, "seqlen": seqlen, "fmt": fmt, "sampling": sampling,
            "data_dir": str(data_dir), "tokenizer": str(model_path), "vocab": len(tokenizer),
            "provenance": 2}  # 2: resolved source, split and official_split recorded (older entries miss)
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


def build_adapter(model_id: str, r: int | list[int], *, mode: str = "kpa", calib_dataset: str = "nqopen", calib_size: int = 256,
                  seed: int = 233, seqlen: int = 2048, batch_size: int = 8, save_path=None, use_cache=False,
                  target_modules=None, data_dir=None, fmt="llama2-chat", sampling="random", dtype="float32",
                  device="cpu", options=None) -> dict:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig

    from loralab.decomposition.attach import attach_corda_eigens

    rs = list(r) if isinstance(r, (list, tuple)) else [r]  # the command passes its --r list: one rank expected
    targets = list(target_modules or PROJECTIONS)
    problems = argument_problems(mode=mode, rs=rs, calib_dataset=calib_dataset, calib_size=calib_size,
                                 calib_seqlen=seqlen, batch_size=batch_size, data_dir=data_dir)
    rank = rs[0] if len(rs) == 1 and rs[0] >= 1 else None
    # the model id, the target names and the rank on its meta-device skeleton, as the command checks them
    _raise(problems + model_problems(model_id, rank=rank, target_modules=targets, calib_seqlen=seqlen))
    r = rs[0]
    torch.manual_seed(seed)
    start = time.time()
    model, tokenizer, path = _load(model_id, dtype, device)
    config = LoraConfig(r=max(r, 1), lora_alpha=max(r, 1), lora_dropout=0.0, init_lora_weights="corda",
                        target_modules=targets, task_type="CAUSAL_LM",
                        corda_config=CordaConfig(corda_method="ipm" if mode == "ipa" else "kpm"))
    _raise(rank_problems(model, config))  # where the model had no skeleton (a GGUF file, ...): on its layers
    batches, provenance = calibration_batches(path, tokenizer, calib_dataset, calib_size, seed, seqlen, batch_size,
                                              data_dir, fmt, sampling, use_cache)
    provenance = overlap_provenance(provenance, list(EVAL_FILES), data_dir, f"decompose --mode {mode}")  # any evaluation
    options = dict(options or {})
    if use_cache:
        options.setdefault("cache_dir", str(cache.default_cache_dir()))
    attach_corda_eigens(model, config, batches, options=options)
    peft_model = get_peft_model(model, config)
    info = {"model_id": model_id, "r": r, "mode": mode, "calibration": provenance, "options": options,
            "seconds": round(time.time() - start, 1)}
    if save_path is not None:
        out = Path(save_path).resolve()
        adapter_config = peft_model.peft_config["default"]
        adapter_config.init_lora_weights = True
        adapter_config.base_model_name_or_path = str(out)  # the residual model below, not model_id (see the docstring)
        peft_model.get_base_model().config.save_pretrained(out)  # peft's vocabulary check reads the base's config.json
        peft_model.save_pretrained(out / "adapter")
        residual = peft_model.unload()
        residual.save_pretrained(out)
        tokenizer.save_pretrained(out)
        info.update(save_path=str(out), residual_model=str(out), adapter=str(out / "adapter"))
        (out / RESIDUAL_MARKER).write_text(json.dumps(info, indent=2, default=str))
    return info


def _study_stats(model, batches, use_cache: bool) -> dict:
    """``study.calibrate``'s statistics, from the on-disk cache under ``use_cache`` (keyed by the
    model's linear weights and the calibration batches), so a resumed study skips the pass."""
    from loralab.decomposition.study import calibrate, linear_layers

    key = None
    if use_cache:
        key = cache.make_key("study-stats", cache.model_fingerprint(model, list(linear_layers(model))),
                             cache.batches_digest(batches))
        hit = cache.load(cache.default_cache_dir(), "study", key, map_location=next(model.parameters()).device)
        if hit is not None:
            say("calibration statistics: from the cache")
            return hit
    stats = calibrate(model, batches)
    if key is not None and distributed.is_main():
        cache.save(cache.default_cache_dir(), "study", key, stats)
    return stats


def run_study(model_id: str, rs: list[int], methods: list[str], *, calib_dataset: str = "alpaca",
              calib_size: int = 256, seed: int = 233, calib_seqlen: int = 2048, batch_size: int = 8,
              seq_len: int = 2048, max_windows=None, corpora=("wikitext2", "ptb"), data_dir=None, out_dir=None,
              use_cache=False, dtype="float32", device="cpu", fmt="llama2-chat", solver="gram",
              force: bool = False) -> list[dict]:
    """Base perplexity plus one row per (method, r). With ``out_dir`` each row is written as it
    finishes; rows a previous run of the same settings left there are kept and not scored again
    (other settings' files: refused unless ``force``, see study_report.finished_rows)."""
    from loralab.decomposition.study import corpus_tokens, full_decompose, untie_output
    from loralab.decomposition.study_report import finished_rows, sort_rows, write_report
    from loralab.models import load_tokenizer
    from loralab.tasks.metrics import settle
    from loralab.tasks.perplexity import perplexity

    corpora = list(corpora)
    _raise(argument_problems(mode="full-decompose", rs=rs, calib_dataset=calib_dataset, calib_size=calib_size,
                             calib_seqlen=calib_seqlen, batch_size=batch_size, data_dir=data_dir, seq_len=seq_len,
                             max_windows=max_windows)
           + model_problems(model_id, calib_seqlen=calib_seqlen, study_rs=rs))
    name = canonical_name(calib_dataset)
    meta = {"model_id": model_id, "calibration": {"name": name, "source": source_of(name, data_dir),
            "num_samples": calib_size, "seed": seed, "seqlen": calib_seqlen, "fmt": fmt, "sampling": "random"},
            "seq_len": seq_len, "max_windows": max_windows, "corpora": corpora, "solver": solver, "dtype": dtype}
    rows = finished_rows(out_dir, meta, force) if out_dir is not None else []
    wanted = [("base", 0)] + [(m, r) for m in methods for r in dict.fromkeys(rs) if r > 0]
    done = {(row["method"], row["r"]) for row in rows}
    todo = [w for w in wanted if w not in done]
    if rows:
        kept = [f"{m} r={r}" for m, r in wanted if (m, r) in done]
        say(f"resuming the study in {out_dir}: {len(kept)} of {len(wanted)} row(s) already there, skipped "
            f"({', '.join(kept) or 'none of this run'}); {len(todo)} to score")
    if not todo:
        return sort_rows(rows)

    for line in study_warnings(model_id, rs) if distributed.is_main() else []:
        print(f"warning: full-decompose study: {line}", file=sys.stderr, flush=True)
    tokenizer = load_tokenizer(model_id)  # the corpora are windowed before any weights load
    texts = corpus_tokens(tokenizer, corpora, data_dir)
    _raise(window_problems({c: t.numel() for c, t in texts.items()}, seq_len))
    model, _, path = _load(model_id, dtype, device)
    untie_output(model)
    batches, provenance = calibration_batches(path, tokenizer, name, calib_size, seed, calib_seqlen,
                                              batch_size, data_dir, fmt, "random", use_cache)
    meta["calibration"] = provenance
    meta["scored_files"] = {c: eval_file(c, data_dir) for c in corpora}
    overlap = evaluation_overlap(provenance, corpora, data_dir)
    if overlap:
        meta.update(overlap=overlap, overlap_note=overlap_note(provenance, overlap))
        warn_overlap(provenance, overlap, "full-decompose study")
    stats = _study_stats(model, batches, use_cache) if any(m != "base" for m, _ in todo) else {}
    count = {"row": len(wanted) - len(todo)}

    def evaluate(m, label: str) -> dict:
        count["row"] += 1
        windows = {c: t.numel() // seq_len if max_windows is None else min(max_windows, t.numel() // seq_len)
                   for c, t in texts.items()}
        say(f"[row {count['row']}/{len(wanted)}] {label}: scoring " +
            ", ".join(f"{c} ({n} windows of {seq_len} tokens)" for c, n in windows.items()))
        # an overflowing perplexity (a rank that destroys the model) is recorded by the degenerate rule
        return settle({c: perplexity(m, tokenizer, texts[c], seq_len=seq_len, max_windows=max_windows,
                                     progress=distributed.is_main()) for c in corpora})

    def record(row: dict) -> None:
        rows.append(row)
        say(row_line(row, corpora))
        if out_dir is not None and distributed.is_main():
            write_report(rows, corpora, out_dir, meta, with_plot=False)

    if ("base", 0) in todo:
        record({"method": "base", "r": 0, **evaluate(model, "base")})
    for method in methods:
        left = [r for r in dict.fromkeys(rs) if r > 0 and (method, r) in todo]
        if left:
            it = iter(left)
            full_decompose(model, stats, method, left, lambda m: evaluate(m, f"{method} r={next(it)}"), solver=solver,
                           on_result=lambda r, ppl: record({"method": method, "r": r, **ppl}))
    if out_dir is not None and distributed.is_main():
        files = write_report(rows, corpora, out_dir, meta)
        say("study written: " + ", ".join(f"{kind} {path}" for kind, path in files.items() if path))
    return sort_rows(rows)
