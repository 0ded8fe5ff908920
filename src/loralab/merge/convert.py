"""PiSSA/CorDA adapter -> plain LoRA for the original base (``loralab merge --to-lora``).

PiSSA and CorDA train on a residual W_res = W - s B0 A0, so the trained model is
W_res + s B A = W + s (B A - B0 A0). That delta is a rank-2r LoRA on the original base:
A' = [A ; A0] (stacked on the rank axis), B' = [B | -B0], with r and lora_alpha doubled so
that the scaling alpha/r is unchanged (x sqrt 2 for alpha under rsLoRA, whose scaling is
alpha/sqrt r); rank/alpha patterns are doubled likewise. This is what peft documents as
``save_pretrained(path_initial_model_for_weight_conversion=...)``; here it works on two saved
adapter folders, with no model in memory. The two folders must agree on the settings that shape the
delta (``r``, ``lora_alpha``, ``use_rslora``, which modules: ``AS_SETS`` compared as sets).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch


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


AS_SETS = ("target_modules", "exclude_modules", "layers_to_transform")
"""Keys whose lists peft means as sets (``LoraConfig`` turns target/exclude_modules into sets, and
``save_pretrained`` writes ``list(set)``: its order follows PYTHONHASHSEED, so one run's folders differ)."""


def _differs(key: str, trained: dict, initial: dict) -> str | None:
    """Why ``key`` of a trained and an initial adapter_config.json differ, or None. ``AS_SETS`` keys
    compare as sets (None and [] alike; a regex string as itself) and the message names only the
    names one side has and the other lacks."""
    a, b = trained.get(key), initial.get(key)
    if key in AS_SETS and not isinstance(a, str) and not isinstance(b, str):
        a, b = ({v} if isinstance(v, int) else set(v or ()) for v in (a, b))
        if a == b:
            return None
        only = [f"{side} only {sorted(x - y, key=str)}" for side, x, y in (("trained", a, b), ("initial", b, a)) if x - y]
        return f"{key!r} differs: " + ", ".join(only)
    return None if a == b else f"{key!r}: trained {a!r} vs initial {b!r}"


def convert_to_lora(trained: str, initial: str, out_dir: str) -> Path:
    """Write the rank-2r LoRA adapter (delta B A - B0 A0) that reproduces a trained PiSSA/CorDA
    adapter on the original, undecomposed base model. Raises ValueError listing every setting in which
    the two folders' adapter_config.json differ (``r``, ``lora_alpha``, ``use_rslora``, ``AS_SETS``), or
    for DoRA / rsLoRA with rank patterns."""
    from safetensors.torch import save_file

    config, w = _load_adapter(trained)
    init_config, w0 = _load_adapter(initial)
    problems = [p for k in ("r", "lora_alpha", "use_rslora", *AS_SETS) if (p := _differs(k, config, init_config))]
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
