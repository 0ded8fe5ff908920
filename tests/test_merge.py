"""Merging and PiSSA/CorDA -> LoRA conversion on the real SmolLM2-135M (a few layers targeted)."""

import copy
import json

import pytest
import torch

from loralab.merge import convert_to_lora, merge_adapter


@pytest.fixture(scope="module")
def smol(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32), tok


def _train_step(peft_model):
    """Stand-in for training: move every LoRA factor (A and B) by a fixed random amount."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def _logits(model, tok):
    x = tok(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt")
    with torch.no_grad():
        return model(**x).logits


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_model_equals_unmerged(smol, tmp_path, use_dora):
    from peft import LoraConfig, get_peft_model

    base, tok = smol
    # without task_type the base's own architecture is used; with it, the task type's class (issue 12)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[0, 5],
                        use_dora=use_dora, task_type="CAUSAL_LM" if use_dora else None)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    _train_step(peft_model)
    expected = _logits(peft_model, tok)
    assert not torch.allclose(expected, _logits(base, tok), atol=1e-3)  # the adapter does change the model
    peft_model.save_pretrained(tmp_path / "adapter")
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    out = merge_adapter(str(base_dir), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, tok), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_corda_rank_2r_conversion_reproduces_trained_model(smol, tmp_path):
    pytest.importorskip("attr", reason="peft's corda module imports the attrs package")
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora.config import CordaConfig

    from loralab.decomposition import attach_corda_eigens

    base, tok = smol
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1],
                        init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))
    model = copy.deepcopy(base)
    batches = [tok(["who wrote the lyrics of hey jude", "when did the berlin wall fall"], return_tensors="pt",
                   padding=True)] if tok.pad_token else [tok("who wrote the lyrics of hey jude", return_tensors="pt")]
    attach_corda_eigens(model, config, batches, options={"progress": False})
    peft_model = get_peft_model(model, config)
    torch.testing.assert_close(_logits(peft_model, tok), _logits(base, tok), rtol=1e-4, atol=1e-4)  # starts unchanged
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(tmp_path / "init")
    _train_step(peft_model)
    trained_logits = _logits(peft_model, tok)
    peft_model.save_pretrained(tmp_path / "trained")
    out = convert_to_lora(str(tmp_path / "trained"), str(tmp_path / "init"), str(tmp_path / "lora"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
    on_original = PeftModel.from_pretrained(copy.deepcopy(base), str(out))  # the untouched base model
    torch.testing.assert_close(_logits(on_original, tok), trained_logits, rtol=1e-4, atol=2e-4)
    with pytest.raises(ValueError, match="'r'"):
        cfg["r"] = 16
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        convert_to_lora(str(out), str(tmp_path / "init"), str(tmp_path / "bad"))
