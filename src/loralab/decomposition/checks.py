"""``loralab decompose``'s checks of the model and the output, made before any weights load (and so before any
calibration, which costs minutes on a large model): the model id and its config, the ``--target-modules``
names (each must match a module: peft skips a typo in silence where another name matches) and the rank
against every targeted layer (peft's ``corda_init`` would fail after the calibration with "Matrix U size
mismatch"), the last two on the model's meta-device skeleton; ``--save-path`` and ``--device``. The numeric
arguments and the calibration set are ``arguments.argument_problems``. Each returns every problem it finds;
the caller raises one ``ConfigError`` (exit 2) naming them all.
"""

from __future__ import annotations

from loralab.decomposition.arguments import rank_problems


def model_problems(model_id: str, *, rank: int | None = None, target_modules=()) -> list[str]:
    """What the model's config alone shows, no weight read: an id naming no model (``models.check_model_id``),
    a config that cannot be read or built into a causal LM (``models.Unreachable``'s line for a hub id offline
    and not cached), and with ``rank`` (kpa/ipa) every name of ``target_modules`` that matches no module, with the
    closest name (``methods.common.unmatched_names``, the check ``loralab run`` makes: peft adapts the names that
    match and skips a typo in silence where another name matches), then ``arguments.rank_problems``. All on the
    model's skeleton (``skeleton.build_skeleton``: built from its config on the meta device, as ``loralab run``'s
    checks are; module names and weight shapes, no memory). One line per problem, flags named as ``--model``,
    ``--target-modules``, ``--r``."""
    from peft import LoraConfig

    from loralab import models
    from loralab.methods.common import unmatched_names

    problems = [p.replace("'model_id'", "'--model'", 1) for p in models.check_model_id(model_id)]
    if problems:
        return problems
    skeleton, problems = _skeleton(model_id)
    if skeleton is None or rank is None:
        return problems
    unmatched = unmatched_names(skeleton, target_modules, "'--target-modules'")
    if target_modules and len(unmatched) == len(set(target_modules)):  # none matches: no layer to rank
        return unmatched
    return unmatched + rank_problems(skeleton, LoraConfig(r=rank, target_modules=list(target_modules)))


def _skeleton(model_id: str):
    """(the causal LM's skeleton, []), or (None, why it has none: one line per problem; [] where the load will
    tell). A GGUF file is converted first (the load right after reads the conversion anyway)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loralab import models
    from loralab.skeleton import build_skeleton

    def unbuildable(exc: Exception) -> list[str]:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        return [f"'--model' = {model_id!r}: no causal language model can be built from its config ({lines[0][:300]})"]

    try:
        models.resolve_model_path(model_id)
    except (OSError, ValueError, KeyError) as exc:  # a GGUF file that does not convert
        return None, unbuildable(exc)
    skeleton = build_skeleton(model_id, "causal_lm")
    if skeleton is not None:
        return skeleton, []
    try:  # build_skeleton never raises: read and build again, for the reason
        if model_id.startswith(models.RANDOM_PREFIX):
            config = models.random_config(model_id, "causal_lm")
        else:
            config = models._from_pretrained(AutoConfig.from_pretrained, model_id, "config")
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except models.Unreachable as exc:
        return None, exc.problems
    except (OSError, ValueError, KeyError) as exc:  # no config.json, an unknown model_type, not a causal LM
        return None, unbuildable(exc)
    return None, []


def save_path_problems(save_path, force: bool) -> list[str]:
    """``--save-path`` must be a new or empty folder (an adapter trained on the residual model there names it
    as its base: overwriting it would change that base under it), or any folder with ``force``; never a file."""
    from pathlib import Path

    if save_path is None:
        return []
    path = Path(save_path)
    if path.exists() and not path.is_dir():
        return [f"'--save-path' = {str(save_path)!r} is a file; it must be a folder (new or empty)"]
    if path.is_dir() and any(path.iterdir()) and not force:
        return [f"'--save-path' = {str(save_path)!r} is a folder that is not empty: give a new or empty folder, "
                "or --force to write over what is there"]
    return []


def device_problems(device: str | None) -> list[str]:
    """``--device`` must be a torch device this machine has: cpu, cuda or cuda:N (None: cuda if available)."""
    import torch

    if device is None:
        return []
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return [f"'--device' = {device!r} is not a torch device; allowed: cpu, cuda, cuda:N"]
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return [f"'--device' = {device!r}: no CUDA GPU is visible here; allowed: cpu"]
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return [f"'--device' = {device!r}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1})"]
    return []
