"""On-disk cache for the CorDA pipeline: calibration sets, covariances, decompositions.

The official code keys its cache files by model name, dataset and size only, so a changed model
or setting silently reuses stale files. Here every entry is keyed by a digest of everything that
determines it: a fingerprint of the model's target weights (names, shapes, dtypes and a strided
sample of values), a digest of the calibration token ids and masks, and the settings (options,
ranks, mode). Any change gives a new key, i.e. a cache miss. Entries are ``torch.save`` files
under ``<cache_dir>/<kind>/<key>.pt``, written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def default_cache_dir() -> Path:
    from loralab.models import cache_root

    return cache_root() / "corda"


def tensor_digest(t: torch.Tensor, max_values: int | None = None) -> str:
    """sha256 of a tensor's dtype, shape and values (a strided sample of ``max_values`` if given)."""
    flat = t.detach().reshape(-1)
    if max_values is not None and flat.numel() > max_values:
        flat = flat[:: flat.numel() // max_values]
    flat = flat.cpu().contiguous()
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(flat.numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module, names: list[str], values_per_weight: int = 4096) -> str:
    """Digest of the named modules' weights (strided value sample: cheap even at 8B scale)."""
    modules = dict(model.named_modules())
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update(tensor_digest(modules[name].weight, values_per_weight).encode())
    return h.hexdigest()


def batches_digest(batches) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
            if key in batch:
                h.update(key.encode())
                h.update(tensor_digest(torch.as_tensor(batch[key])).encode())
    return h.hexdigest()


def make_key(*parts) -> str:
    """A short digest of JSON-serialisable parts (settings dicts, other digests)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def path_for(cache_dir, kind: str, key: str) -> Path:
    return Path(cache_dir) / kind / f"{key}.pt"


def load(cache_dir, kind: str, key: str, map_location=None):
    """The cached object, or None on a miss."""
    if cache_dir is None:
        return None
    path = path_for(cache_dir, kind, key)
    if not path.exists():
        return None
    return torch.load(path, map_location=map_location, weights_only=False)


def save(cache_dir, kind: str, key: str, obj) -> Path | None:
    if cache_dir is None:
        return None
    path = path_for(cache_dir, kind, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path
