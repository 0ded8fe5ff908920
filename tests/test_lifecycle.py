"""A record for every ending, and the adapter saved before any evaluation: a failing evaluation
leaves the adapter and a `failed` record (with its phase); evaluation runs in the precision
training used (the bf16-autocast generation failure of a bf16 base, reproduced on CPU); a
non-finite loss stops with `diverged`."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel

from loralab.cli import main
from loralab.results import validate


def make(tmp_path, name, params, adapter):
    folder = tmp_path / "experiments" / name
    folder.mkdir(parents=True)
    LoraConfig(**adapter).save_pretrained(folder)
    (folder / "training_parameters.json").write_text(json.dumps(params))
    return folder


def records(tmp_path):
    return [json.loads(p.read_text()) for p in (tmp_path / "loralab-results").rglob("*.json")]


def test_failing_evaluation_keeps_adapter_and_writes_failed_record(tmp_path, data_dir, monkeypatch, capsys):
    from loralab.tasks.glue import GlueTask

    def broken(self, *args, **kwargs):
        raise RuntimeError("scorer crashed")

    monkeypatch.setattr(GlueTask, "evaluate", broken)
    folder = make(tmp_path, "lora/rte", {"task": "glue/rte", "max_train_samples": 8, "max_eval_samples": 4,
                                         "batch_size": 4, "max_steps": 2, "logging_steps": 1},
                  {"r": 2, "target_modules": ["query"]})
    assert main(["run", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "failed: lora/rte: RuntimeError: scorer crashed" in err
    # no terminal, no -v: no live bar, so each logging step is a plain line
    assert "[loralab] step 1/2: loss " in err and "[loralab] step 2/2: loss " in err
    (record,) = records(tmp_path)
    assert validate(record) == []
    info = record["train_info"]
    assert info["status"] == "failed" and info["steps"] == 2
    assert info["error"]["phase"] == "evaluate" and info["error"]["type"] == "RuntimeError"
    assert "scorer crashed" in info["error"]["traceback"]
    from loralab.models import load_model

    PeftModel.from_pretrained(load_model("packaged:minilm-l6", "seq_cls", 2), info["adapter_path"])  # saved first


def test_non_finite_loss_stops_as_diverged(tmp_path, data_dir, capsys):
    folder = make(tmp_path, "lora/rte", {"task": "glue/rte", "max_train_samples": 16, "max_eval_samples": 4,
                                         "batch_size": 4, "max_steps": 6, "learning_rate": 1e30, "logging_steps": 1,
                                         "checkpoint_steps": 1},
                  {"r": 2, "target_modules": ["query", "value"]})
    assert main(["run", str(folder)]) == 3
    (record,) = records(tmp_path)
    info = record["train_info"]
    assert info["status"] == "diverged" and info["error"]["phase"] == "train"
    assert info["steps"] < 6 and 1 <= info["error"]["step"] <= info["steps"]
    assert info["error"]["last_good_checkpoint"] is None or "step-" in info["error"]["last_good_checkpoint"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the GPU twin of the CPU regression needs CUDA")])])
def test_bf16_autocast_generation_mismatch_reproduced_then_fixed(smollm2_path, device):
    """A bf16 base with fp32 adapters prepared for bf16 autocast: generation outside autocast fails
    as the field report says; inside the run's autocast (what evaluation now uses) it works."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.speed.step import autocast_context, prepare_model
    from loralab.speed_settings import Speed

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.bfloat16).to(device)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    prepare_model(model, Speed(autocast="bfloat16", compile=False, lora_scale_at_rank=True, lora_shared_input=True))  # the run's default on CUDA
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    ids = tok("Question: 2 + 3 =", return_tensors="pt").to(device)
    with pytest.raises(RuntimeError, match="dtype"):
        model.generate(**ids, max_new_tokens=2, do_sample=False)
    with torch.no_grad(), autocast_context(model, device):
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 2


@pytest.mark.slow
def test_bf16_base_with_autocast_trains_saves_and_evaluates(tmp_path, data_dir):
    folder = make(tmp_path, "lora/gsm8k", {
        "task": "gsm8k", "model_id": "packaged:smollm2-135m", "dtype": "bfloat16", "speed": {"autocast": "bfloat16"},
        "max_train_samples": 4, "batch_size": 2, "max_steps": 1, "max_length": 96, "eval_tasks": ["gsm8k"],
        "max_eval_samples": 2, "generation": {"max_new_tokens": 4, "batch_size": 2}},
        {"r": 2, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"})
    assert main(["run", str(folder)]) == 0
    (record,) = records(tmp_path)
    assert record["train_info"]["status"] == "success"
    assert any(k.startswith("gsm8k/") for k in record["eval"])
    assert record["train_info"]["speed"]["autocast"] == "bfloat16"
