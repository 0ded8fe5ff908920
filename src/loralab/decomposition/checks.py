"""``loralab decompose``'s input checks, all made before any calibration (which costs minutes on a
large model): the numeric arguments, the calibration set (``calibration.source_problem``), and the
rank against every targeted layer (peft's ``corda_init`` would fail after the calibration with
"Matrix U size mismatch"). Each returns every problem it finds; the caller raises one
``ConfigError`` (exit 2) naming them all.
"""

from __future__ import annotations

from loralab.decomposition.calibration import source_problem


def _positive(name: str, value) -> list[str]:
    return [] if value is None or value > 0 else [f"'{name}' = {value!r} must be a positive integer"]


def argument_problems(*, mode: str, rs: list[int], calib_dataset: str, calib_size: int, calib_seqlen: int,
                      batch_size: int, data_dir=None, seq_len: int | None = None, max_windows: int | None = None) -> list[str]:
    """Every problem of the arguments that needs no model."""
    problems = []
    if mode == "full-decompose":
        problems += [f"'--r' = {r} must be 0 or more (components discarded per layer)" for r in rs if r < 0]
        problems += _positive("--seq-len", seq_len) + _positive("--max-windows", max_windows)
    elif len(rs) != 1:
        problems.append(f"'--r' takes one rank in mode {mode!r}, got {rs}")
    elif rs[0] < 1:
        problems.append(f"'--r' = {rs[0]}: the adapter rank must be at least 1")
    problems += _positive("--calib-size", calib_size) + _positive("--calib-seqlen", calib_seqlen)
    problems += _positive("--batch-size", batch_size)
    problem = source_problem(calib_dataset, data_dir)
    return problems + ([f"'--calib-dataset': {problem}"] if problem else [])


def rank_problems(model, lora_config) -> list[str]:
    """The adapter rank against every layer CorDA targets: it must not exceed min(in, out). Names the
    first layer too small and how many others are."""
    from loralab.decomposition.attach import _rank, _weight_out_in, corda_targets

    try:
        targets = corda_targets(model, lora_config)
    except ValueError as exc:
        return [f"'--target-modules': {exc}"]
    bad = []
    for name, module in targets.items():
        out_f, in_f = _weight_out_in(module).shape
        r = _rank(lora_config, name)
        if r > min(out_f, in_f):
            bad.append((name, r, in_f, out_f))
    if not bad:
        return []
    name, r, in_f, out_f = bad[0]
    more = f" (and {len(bad) - 1} more of the {len(targets)} targeted layers)" if len(bad) > 1 else ""
    return [f"'--r' = {r} is larger than layer {name} ({in_f}->{out_f}) allows (at most {min(in_f, out_f)}){more}"]


def model_problems(model_id: str, *, rank: int | None = None, target_modules=()) -> list[str]:
    """What the model's config alone shows, no weight read: an id naming no model (``models.check_model_id``),
    a config that cannot be read (``models.Unreachable``'s line for a hub id offline), and with ``rank``
    (kpa/ipa) ``rank_problems`` against ``target_modules``, on the model built from its config on the meta
    device (its modules and weight shapes, no memory). One line per problem, flags named as ``--model``."""
    import torch
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    from loralab import models

    problems = [p.replace("'model_id'", "'--model'", 1) for p in models.check_model_id(model_id)]
    if problems:
        return problems
    try:
        if model_id.startswith(models.RANDOM_PREFIX):
            config = models.random_config(model_id, "causal_lm")
        else:
            config = models._from_pretrained(AutoConfig.from_pretrained, model_id, "config")
        if rank is None:
            return []
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except models.Unreachable as exc:
        return exc.problems
    except (OSError, ValueError, KeyError) as exc:  # no config.json, an unknown model_type, not a causal LM
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        return [f"'--model' = {model_id!r}: no causal language model can be built from its config ({lines[0][:300]})"]
    return rank_problems(model, LoraConfig(r=rank, target_modules=list(target_modules)))


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
