"""The adapter holds what trained: with LoRA on SmolLM2's lm_head (as seed 000's recipe puts it),
the runner's saver writes only LoRA tensors — no frozen copies of embed_tokens/lm_head from peft's
save_embedding_layers heuristic — and plain peft reloads it with equal logits (plain LoRA, and a
residual init through the rank-2r saver)."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loralab.data import pad_id
from loralab.experiment import read_experiment
from loralab.run import _save
from loralab.run.build import build
from loralab.run.record import Record
from loralab.run.step import Step

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("init,targets", [(True, ["q_proj", "v_proj", "lm_head"]), ("pissa", ["q_proj", "v_proj"])],
                         ids=["lora-lm_head", "pissa-residual-saver"])
def test_lm_head_adapter_holds_only_lora_tensors_and_reloads(tmp_path, data_dir, smollm2_path, init, targets):
    folder = tmp_path / "experiments" / "lm-head" / "lora"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets,
         "task_type": "CAUSAL_LM", "init_lora_weights": init}))
    (folder / "training_parameters.json").write_text(json.dumps(
        {"task": "gsm8k", "model_id": "packaged:smollm2-135m", "max_train_samples": 4, "batch_size": 4,
         "max_length": 64, "learning_rate": 1e-2, "data_dir": str(data_dir)}))
    exp = read_experiment(folder)
    built = build(exp)
    optimizer = built.method.make_optimizer(built.model, built.cfg, exp.params)
    Step(built.model, optimizer, kind="causal_lm", normalization="tokens", micro_batch=None, packing=True,
         max_length=64, pad_to=None, pad_id=pad_id(built.tokenizer), device=torch.device("cpu"), graphs=False,
         max_grad_norm=0.0)(built.data.train[:4])
    record = Record()
    _save(built, tmp_path / "adapter", record, exp.params.model_id)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "packaged:smollm2-135m"  # the id given, not a cache path
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "base_model: packaged:smollm2-135m" in card and ".cache" not in card  # peft's model card too
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors), [k for k in tensors if "lora_" not in k]
    assert record.file_size < 5e6  # rank-4 factors, not a 49,152 x 576 embedding matrix
    ids = torch.tensor([built.data.train[0]["input_ids"][:24]])
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        trained = built.model.eval()(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(input_ids=ids).logits
    assert not torch.allclose(trained, before, atol=1e-3)  # the step moved the model
    torch.testing.assert_close(reloaded, trained, atol=2e-4, rtol=1e-4)


def test_residual_init_on_tied_lm_head_is_refused(tmp_path, data_dir):
    """PiSSA on SmolLM2's lm_head would rewrite the tied input embeddings too: refused, naming both."""
    from loralab.config import ConfigError

    folder = tmp_path / "experiments" / "tied" / "pissa"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "lm_head"], "task_type": "CAUSAL_LM",
         "init_lora_weights": "pissa"}))
    (folder / "training_parameters.json").write_text(json.dumps(
        {"task": "gsm8k", "model_id": "packaged:smollm2-135m", "max_train_samples": 2, "data_dir": str(data_dir)}))
    with pytest.raises(ConfigError, match="lm_head, which is tied to model.embed_tokens"):
        build(read_experiment(folder))
