"""Issue 12, kind 4: ``loralab merge`` writes a checkpoint of the adapter's own task kind, trained
head included, or refuses with exit 2.

The adapters are real: loralab's runner trains MiniLM on real GLUE rows for a few steps (LoRA on
SST-2, DoRA on STS-B regression), and the merged checkpoint is loaded with plain
``AutoModelForSequenceClassification`` and compared with the unmerged peft model on 64 real rows."""

import csv
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from loralab.cli import main


def _train(tmp_path, data_dir, monkeypatch, task, adapter):
    folder = tmp_path / "experiments" / "lora" / task.replace("/", "-")
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **adapter}))
    (folder / "training_parameters.json").write_text(json.dumps({
        "task": task, "data_dir": str(data_dir), "max_train_samples": 64, "max_eval_samples": 16,
        "batch_size": 16, "max_steps": 4, "learning_rate": 5e-3, "logging_steps": 2,
    }))
    monkeypatch.setenv("LORALAB_RESULTS_DIR", str(tmp_path / "res"))
    assert main(["run", str(folder)]) == 0
    record = json.loads(next((tmp_path / "res").rglob("*.json")).read_text())
    return record["train_info"]["adapter_path"]


def _rows(data_dir, folder, columns, n=64):
    with open(data_dir / "glue" / folder / "dev.tsv", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [tuple(r[c] for c in columns) for _, r in zip(range(n), reader)]


def _logits(model, tokenizer, rows):
    batch = tokenizer([r[0] for r in rows], *([[r[1] for r in rows]] if len(rows[0]) > 1 else []),
                      padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _check_merge(tmp_path, data_dir, adapter_dir, folder, columns, num_labels, minilm_path):
    from loralab.models import load_model

    saved = json.loads((tmp_path / adapter_dir / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and {"classifier", "pooler"} <= set(saved["modules_to_save"])
    out = tmp_path / "merged"
    assert main(["merge", "--base", "packaged:minilm-l6", "--adapter", str(adapter_dir), "--out", str(out)]) == 0

    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = _rows(data_dir, folder, columns)
    unmerged = PeftModel.from_pretrained(load_model("packaged:minilm-l6", "seq_cls", num_labels), adapter_dir).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert merged.config.num_labels == num_labels
    expected, got = _logits(unmerged, tokenizer, rows), _logits(merged, tokenizer, rows)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if num_labels > 1:
        assert (got.argmax(-1) == expected.argmax(-1)).all()
    # the head is the trained one, not the base's or a fresh random one
    fresh = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=num_labels)
    assert not torch.allclose(merged.bert.pooler.dense.weight, fresh.bert.pooler.dense.weight)


@pytest.mark.slow
def test_runner_trained_sst2_lora_merges_with_its_head(tmp_path, data_dir, monkeypatch, minilm_path):
    """Issue 12's case: a LoRA SST-2 adapter trained by loralab's runner."""
    adapter_dir = _train(tmp_path, data_dir, monkeypatch, "glue/sst2",
                         {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"})
    _check_merge(tmp_path, data_dir, adapter_dir, "SST-2", ("sentence",), 2, minilm_path)


def test_dora_regression_adapter_merges_with_its_head(tmp_path, data_dir, minilm_path):
    """Variant: DoRA, one regression output (STS-B sentence pairs, token type ids), head moved by hand."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=1, problem_type="regression")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], use_dora=True,
                     modules_to_save=["classifier", "pooler"], task_type="SEQ_CLS")
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    _check_merge(tmp_path, data_dir, tmp_path / "adapter", "STS-B", ("sentence1", "sentence2"), 1, minilm_path)


@pytest.fixture
def peft_adapter(tmp_path, minilm_path):
    """A peft adapter built on MiniLM for the refusal cases (cheap; nothing trains)."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier", "pooler"],
                     task_type="SEQ_CLS")
    get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def _merge(adapter, tmp_path, base="packaged:minilm-l6"):
    return main(["merge", "--base", base, "--adapter", str(adapter), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("changes,message", [
    ({"task_type": None}, "no 'task_type' but saves modules"),
    ({"task_type": "SEQ_CLASSIFICATION"}, "'task_type' = 'SEQ_CLASSIFICATION' is not one loralab can merge"),
    ({"peft_type": "PROMPT_TUNING"}, "prompt-learning adapter"),
])
def test_unmergeable_configs_exit_2(peft_adapter, tmp_path, capsys, changes, message):
    _edit_config(peft_adapter, **changes)
    assert _merge(peft_adapter, tmp_path) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_classifier_adapter_without_saved_head_exits_2(peft_adapter, tmp_path, capsys):
    """The head trained but was not saved (modules_to_save emptied): no checkpoint can reproduce it."""
    from safetensors.torch import load_file, save_file

    weights = load_file(peft_adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "lora_" in k}, peft_adapter / "adapter_model.safetensors")
    _edit_config(peft_adapter, modules_to_save=["pooler"])
    assert _merge(peft_adapter, tmp_path) == 2
    err = capsys.readouterr().err
    assert "saves no classification head" in err


def test_random_base_weights_not_in_the_adapter_exit_2(peft_adapter, tmp_path, capsys):
    """modules_to_save names the pooler only: the classifier would be freshly random in the merge."""
    from safetensors.torch import load_file, save_file

    weights = load_file(peft_adapter / "adapter_model.safetensors")
    kept = {k: v for k, v in weights.items() if "classifier" not in k}
    kept["base_model.model.score.weight"] = torch.zeros(2, 384)  # some head rows, under another name
    save_file(kept, peft_adapter / "adapter_model.safetensors")
    _edit_config(peft_adapter, modules_to_save=["pooler", "score"])
    assert _merge(peft_adapter, tmp_path) == 2
    assert "initialised 2 weight(s) at random" in capsys.readouterr().err


def test_wrong_base_and_missing_arguments_exit_2(peft_adapter, tmp_path, capsys):
    assert _merge(peft_adapter, tmp_path, base="packaged:smollm2-135m") == 2
    assert "loralab merge:" in capsys.readouterr().err
    import shutil

    baseless = tmp_path / "baseless"  # without --base the adapter's recorded base is used; none recorded: exit 2
    shutil.copytree(peft_adapter, baseless)
    _edit_config(baseless, base_model_name_or_path=None)
    assert main(["merge", "--adapter", str(baseless), "--out", str(tmp_path / "o")]) == 2
    assert "--base is required" in capsys.readouterr().err
    assert _merge(tmp_path / "nowhere", tmp_path) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_to_lora_mismatch_exits_2(peft_adapter, tmp_path, capsys):
    import shutil

    initial = tmp_path / "initial"
    shutil.copytree(peft_adapter, initial)
    _edit_config(initial, r=4)
    assert main(["merge", "--adapter", str(peft_adapter), "--to-lora", str(initial), "--out", str(tmp_path / "o")]) == 2
    assert "cannot convert: 'r': trained 2 vs initial 4" in capsys.readouterr().err
