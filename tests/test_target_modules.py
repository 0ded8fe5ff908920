"""``target_modules`` as peft reads it: null is peft's default for the model type, not every linear layer (seed 004's
recipes leave it null and expect q_proj and v_proj), and a listed name that matches nothing is a problem, not a
layer left out in silence."""

import pytest
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loralab.config import ConfigError
from loralab.methods.common import check_ranks, resolve_config
from loralab.models import load_model


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def adapted(model) -> set[str]:
    return {name.removeprefix("base_model.model.").removesuffix(".lora_A.default")
            for name, _ in model.named_modules() if name.endswith("lora_A.default")}


def test_null_targets_are_peft_defaults_for_llama_and_bert(minilm_path):
    llama = tiny_llama()
    cfg = resolve_config(llama, LoraConfig(r=4, task_type="CAUSAL_LM"), "causal_lm")
    assert sorted(cfg.target_modules) == ["q_proj", "v_proj"]
    ours = adapted(get_peft_model(tiny_llama(), cfg))
    plain = adapted(get_peft_model(tiny_llama(), LoraConfig(r=4, task_type="CAUSAL_LM")))  # peft's own resolution
    assert ours == plain and len(ours) == 4
    bert = load_model(str(minilm_path), "seq_cls")
    cfg = resolve_config(bert, LoraConfig(r=4), "seq_cls")
    assert sorted(cfg.target_modules) == ["query", "value"]
    # "all-linear" still means every linear layer outside the head
    cfg = resolve_config(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"), "causal_lm")
    assert len(cfg.target_modules) == 2 * 7


def test_null_targets_without_a_peft_default_are_refused():
    llama = tiny_llama()
    llama.config.model_type = "my-own-arch"
    with pytest.raises(ConfigError, match="'target_modules' is null and peft has no default for model type 'my-own-arch'"):
        resolve_config(llama, LoraConfig(r=4), "causal_lm")


def test_a_target_name_that_matches_nothing_is_named(minilm_path):
    bert = load_model(str(minilm_path), "seq_cls")
    cfg = resolve_config(bert, LoraConfig(r=4, target_modules=["querry", "value"]), "seq_cls")
    assert check_ranks(bert, cfg) == ["adapter_config.json 'target_modules' names 'querry', which matches no module "
                                      "of the model (did you mean 'query'?)"]
    assert check_ranks(bert, resolve_config(bert, LoraConfig(r=4, target_modules=["query", "value"]), "seq_cls")) == []
    # a dotted suffix matches as peft matches it; a regex string is peft's own rule, not split into names
    dotted = resolve_config(bert, LoraConfig(r=4, target_modules=["attention.self.query"]), "seq_cls")
    assert check_ranks(bert, dotted) == []
    assert check_ranks(bert, resolve_config(bert, LoraConfig(r=4, target_modules=r".*\.(query|valu)"), "seq_cls")) == []
