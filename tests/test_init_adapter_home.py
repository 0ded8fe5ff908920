"""``init_adapter`` = "~/...": the folder is read with ``~`` expanded at read time (``read_init_adapter``), so its
weights must load from the same folder (peft's ``load_peft_weights`` takes a path not found as a hub id)."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel

from loralab.init_adapter import load_weights


def _peft(minilm_path: str, seed: int):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=2, target_modules=["query"], init_lora_weights="gaussian")
    return get_peft_model(AutoModel.from_pretrained(minilm_path), cfg)


def test_an_init_adapter_under_home_loads_its_weights(minilm_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    saved = _peft(minilm_path, 0)
    saved.save_pretrained(tmp_path / "decomposed" / "adapter")
    fresh = _peft(minilm_path, 1)
    load_weights(fresh, "~/decomposed/adapter")
    want = dict(saved.named_parameters())
    for name, p in fresh.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, want[name]), name


def test_provenance_of_a_folder_whose_weights_went_raises_oserror(tmp_path):
    """The weights removed between reading the experiment and the build: an OSError naming the folder (the
    docstring's promise; a bare StopIteration escaped before)."""
    import pytest

    from loralab.init_adapter import provenance

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(OSError, match="adapter_model.safetensors"):
        provenance(tmp_path, "packaged:minilm-l6")
