"""A local model folder's content hash (run records, eval outputs) is cached by file path, size and mtime: the
same value as hashing the bytes, not recomputed for unchanged files, recomputed for a rewritten one."""

from __future__ import annotations

import hashlib
import os

from loralab.models import model_provenance


def _plain(folder) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.suffix in {".json", ".safetensors"}):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_the_cached_hash_is_the_bytes_hash_and_a_rewritten_file_is_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    weights = folder / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    first = model_provenance(str(folder))["content_sha256"]
    assert first == _plain(folder)
    assert len(list((tmp_path / "cache" / "content-sha256").iterdir())) == 1

    stat = weights.stat()  # same size and mtime: the cached digest answers without reading the bytes
    weights.write_bytes(b"b" * 4096)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_provenance(str(folder))["content_sha256"] == first

    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a rewrite moves the mtime
    assert model_provenance(str(folder))["content_sha256"] == _plain(folder) != first


def test_an_unwritable_cache_still_gives_the_hash(tmp_path, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("LORALAB_CACHE", str(blocker))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert model_provenance(str(folder))["content_sha256"] == _plain(folder)


def test_links_to_the_same_files_under_other_names_hash_as_their_names(tmp_path, monkeypatch):
    """The digest covers each file's name (a Hugging Face snapshot's links), so the cache key must too: two folders
    linking the same blobs under other names have different hashes, cached or not."""
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "a").write_text('{"model_type": "llama"}')
    (blobs / "b").write_bytes(b"w" * 64)
    for folder, weights in (("one", "model.safetensors"), ("two", "model-00001-of-00001.safetensors")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").symlink_to(blobs / "a")
        (tmp_path / folder / weights).symlink_to(blobs / "b")
    one = model_provenance(str(tmp_path / "one"))["content_sha256"]
    two = model_provenance(str(tmp_path / "two"))["content_sha256"]
    assert (one, two) == (_plain(tmp_path / "one"), _plain(tmp_path / "two")) and one != two
