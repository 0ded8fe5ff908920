"""Merging adapters into their base, and PiSSA/CorDA adapters into plain LoRA.

``merge_adapter``: base (a residual model for PiSSA/CorDA, the original one for LoRA/DoRA) plus
a peft adapter -> one plain transformers checkpoint, through peft's ``merge_and_unload``
(W' = W + s B A; DoRA rescales by its magnitude vector).

``convert_to_lora``: PiSSA and CorDA train on a residual W_res = W - s B0 A0, so the trained model
is W_res + s B A = W + s (B A - B0 A0). That delta is a rank-2r LoRA on the original base:
A' = [A ; A0] (stacked on the rank axis), B' = [B | -B0], with r and lora_alpha doubled so
that the scaling alpha/r is unchanged (x sqrt 2 for alpha under rsLoRA, whose scaling is
alpha/sqrt r); rank/alpha patterns are doubled likewise. This is what peft documents as
``save_pretrained(path_initial_model_for_weight_conversion=...)``; here it works on two saved
adapter folders, with no model in memory.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch


def merge_adapter(base: str, adapter: str, out_dir: str, dtype: str = "float32") -> Path:
    """Load ``base`` (folder or hub id), apply the peft adapter in ``adapter``, merge, save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.models import resolve_model_path

    path = resolve_model_path(base)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(path).save_pretrained(out)
    except (OSError, ValueError):  # a weights-only folder has no tokenizer to copy
        pass
    return out


def _load_adapter(folder) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if (folder / "adapter_model.safetensors").exists():
        weights = load_file(folder / "adapter_model.safetensors")
    else:
        weights = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    return config, weights


def delta_as_lora(weights: dict, initial: dict, config: dict) -> tuple[dict, dict]:
    """ΔW = BA − B₀A₀ = [B | −B₀]·[A ; A₀] as a plain LoRA of rank 2r (peft's documented
    conversion): concatenated weights and the config with r and alpha doubled (alpha × √2 under
    rsLoRA, so the scaling is unchanged). Keys missing from ``initial`` (biases, modules_to_save)
    travel unchanged."""
    out = {}
    for key, a in weights.items():
        if ".lora_A." in key and key in initial:
            out[key] = torch.cat([a, initial[key].to(a.dtype)], dim=0)
        elif ".lora_B." in key and key in initial:
            out[key] = torch.cat([a, -initial[key].to(a.dtype)], dim=1)
        else:
            out[key] = a
    factor = math.sqrt(2) if config.get("use_rslora") else 2
    config = dict(config, r=config["r"] * 2, lora_alpha=config["lora_alpha"] * factor, init_lora_weights=True)
    config["rank_pattern"] = {k: v * 2 for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: v * factor for k, v in (config.get("alpha_pattern") or {}).items()}
    config.pop("corda_config", None)
    return out, config


def convert_to_lora(trained: str, initial: str, out_dir: str) -> Path:
    """Write the rank-2r LoRA adapter (delta B A - B0 A0) that reproduces a trained PiSSA/CorDA
    adapter on the original, undecomposed base model."""
    from safetensors.torch import save_file

    config, w = _load_adapter(trained)
    init_config, w0 = _load_adapter(initial)
    problems = [f"{k!r}: trained {config.get(k)!r} vs initial {init_config.get(k)!r}"
                for k in ("r", "lora_alpha", "use_rslora", "target_modules") if config.get(k) != init_config.get(k)]
    if config.get("use_dora"):
        problems.append("DoRA adapters cannot be expressed as a LoRA delta")
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        problems.append("use_rslora with rank_pattern/alpha_pattern cannot be converted (peft raises too)")
    if problems:
        raise ValueError("cannot convert: " + "; ".join(problems))
    out, config = delta_as_lora(w, w0, config)
    dest = Path(out_dir)
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, dest / "adapter_model.safetensors")
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2))
    readme = Path(trained) / "README.md"
    if readme.exists():
        shutil.copy(readme, dest / "README.md")
    return dest
