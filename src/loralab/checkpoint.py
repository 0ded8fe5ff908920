"""Training checkpoints: what a killed run needs to continue as if it had never stopped.

A checkpoint is a folder ``<output dir>/checkpoints/step-<N>/`` holding
- ``trainable.safetensors``: every trainable tensor (adapter factors, DoRA magnitudes, heads);
- ``optimizer.pt``: optimizer and LR-scheduler state;
- ``state.json``: step, samples and tokens seen, data position (epoch, optimizer batch), the
  metrics history so far, train time, the run's parts so far (one per process: its wall time and
  train time; ``run.record.Record.parts``), the adapter init's cost, the effective configuration
  and its hashes; ``trained`` (the adapter's sha256) in the checkpoint written once training
  finished and the adapter was saved, so that ``--resume`` evaluates without training again;
- ``rng.pt``: Python, NumPy, torch CPU and CUDA random states.
It is written into ``step-<N>.tmp`` and renamed when complete (a kill mid-write leaves no
half checkpoint), and only the newest ``keep_checkpoints`` are kept.

Inits that rewrite the base weights (PiSSA, OLoRA, CorDA, corrected SVD-LoRA-FA, ...) also get
``<output dir>/checkpoints/init_state.safetensors`` once: the adapted layers' residual base
weights and the initial adapter, so a resumed run rebuilds the model from it without redoing the
decomposition (``restore_init_state``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STATE = "state.json"
INIT_STATE = "init_state.safetensors"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor, and the adapter's frozen ones too (LoRA-FA's fixed A): a resumed run
    must not depend on re-drawing them."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters()
            if p.requires_grad or "lora_" in n}


def _portable_optimizer_state(optimizer) -> dict:
    state = optimizer.state_dict()
    groups = []
    for group in state["param_groups"]:
        group = dict(group)
        if isinstance(group.get("lr"), torch.Tensor):  # CUDA-graph optimizers hold lr on the device
            group["lr"] = float(group["lr"])
        groups.append(group)
    return {"state": state["state"], "param_groups": groups}


def save(root: Path, step: int, *, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; prune to the newest ``keep``."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": _portable_optimizer_state(optimizer), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=1, default=str))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints. An old one is renamed away before it is
    deleted, so a kill mid-delete leaves no half checkpoint under a checkpoint's name; leftovers of
    killed saves or deletes (``.tmp``, ``.del``, folders without ``state.json``) are removed."""
    if not root.is_dir():
        return
    for old in list_checkpoints(root)[:-keep]:
        doomed = old.with_name(old.name + ".del")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for leftover in root.glob("step-*"):
        if leftover.is_dir() and (leftover.suffix in (".tmp", ".del") or not (leftover / STATE).exists()):
            shutil.rmtree(leftover, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write ``path`` atomically (a temporary file renamed over it): a kill mid-write leaves the old
    file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (folders ``step-<n>`` holding ``state.json``), oldest first."""
    if not root.is_dir():
        return []
    # only "step-<n>": a save or prune killed mid-way leaves "step-<n>.tmp" / "step-<n>.del", which may still hold a
    # state.json (a SIGKILL between the rename and the delete; --resume then read int("6.del") and failed)
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name) and (p / STATE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def load(path: Path, *, model, optimizer, scheduler) -> dict:
    """Load checkpoint ``path`` into model, optimizer and scheduler; returns its ``state.json``
    (the caller restores the RNG last, with ``set_rng_state(torch.load(path / 'rng.pt'))``)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unexpected = [n for n in tensors if n not in params]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    opt = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return read_state(path)


def load_rng(path: Path) -> None:
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two nested configuration dicts (``a.b`` paths)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


# -- inits that rewrite the base weights --------------------------------------------------------
def save_init_state(root: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an init's tensors (``loralab.run.build.init_tensors``: the adapted layers' base weights
    and every LoRA tensor right after the method's init) to ``root/init_state.safetensors``, atomically."""
    from safetensors.torch import save_file

    cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    root.mkdir(parents=True, exist_ok=True)
    path = root / INIT_STATE
    tmp = root / (INIT_STATE + ".tmp")
    save_file(cpu, str(tmp))
    os.replace(tmp, path)
    return path


@torch.no_grad()
def restore_init_state(path: Path, targets: dict[str, torch.Tensor]) -> None:
    """Copy a saved init state into ``targets`` (name -> the live tensor of a model built with the
    same adapter layout, as ``save_init_state`` was given them). Raises RuntimeError for a saved
    tensor the model lacks."""
    from safetensors.torch import load_file

    for key, value in load_file(str(path)).items():
        if key not in targets:
            raise RuntimeError(f"init state {path} holds {key!r}, which the rebuilt model lacks")
        targets[key].copy_(value.to(targets[key].device, targets[key].dtype))
