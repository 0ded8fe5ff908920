"""End to end on CPU: `loralab run` of a LoRA SFT of SmolLM2-135M on real GSM8K train rows lowers the
training loss, writes a result with GSM8K accuracy from real generations, and re-scoring the saved
generations.jsonl without a model gives the same accuracy."""

import json
import os
from pathlib import Path

import pytest

from loralab.cli import main


@pytest.mark.slow
def test_sft_run_lowers_loss_and_rescoring_matches(tmp_path, data_dir, smollm2_path):
    from peft import LoraConfig

    from loralab.tasks.evaluate import read_records, score_generations

    exp = tmp_path / "experiments" / "llm-e2e" / "smollm2-gsm8k-lora"
    exp.mkdir(parents=True)
    LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM").save_pretrained(exp)
    params = {
        "model_id": "packaged:smollm2-135m", "task": "gsm8k", "data_dir": str(data_dir),
        # Small on purpose (a 2-core CI box): 2 rows seen 3 times, 6 optimizer steps of 1 sequence.
        "max_train_samples": 2, "max_length": 160, "batch_size": 1, "num_epochs": 3,
        "learning_rate": 3e-3, "lr_scheduler": "constant", "weight_decay": 0.0, "logging_steps": 1,
        "eval_tasks": ["gsm8k"], "max_eval_samples": 2, "generation": {"max_new_tokens": 16, "batch_size": 2},
        "device": "cpu", "seed": 0,
    }
    (exp / "training_parameters.json").write_text(json.dumps(params))

    assert main(["run", str(exp)]) == 0

    results = sorted(Path(os.environ["LORALAB_RESULTS_DIR"]).rglob("*.json"))
    assert len(results) == 1
    record = json.loads(results[0].read_text())
    assert record["train_info"]["status"] == "success" and record["train_info"]["steps"] == 6
    losses = [m["train loss"] for m in record["train_info"]["metrics"] if "train loss" in m]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses  # third pass vs first pass
    assert record["meta_info"]["dataset"]["sha256"] == "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"
    accuracy = record["eval"]["gsm8k/accuracy"]
    assert 0.0 <= accuracy <= 1.0 and record["eval"]["gsm8k/n"] == 2
    # the headline the task recorded is the cell the report shows; the evaluation's timing is kept apart
    assert record["meta_info"]["dataset"]["headline"] == "gsm8k/accuracy"
    from loralab.report import build_report

    (table,) = build_report(results).tables
    assert next(iter(table.cells.values())).metric == "gsm8k/accuracy"
    full = json.loads(next(Path(os.environ["LORALAB_OUTPUT_DIR"]).rglob("evaluations.json")).read_text())["gsm8k"]
    assert full["headline"] == "accuracy" and full["seconds"]["total"] > 0

    generations = sorted(Path(os.environ["LORALAB_OUTPUT_DIR"]).rglob("generations.jsonl"))
    assert len(generations) == 1
    records = read_records(generations[0])
    assert [r["task"] for r in records] == ["gsm8k"] * 2 and [r["id"] for r in records] == [0, 1]
    assert all(isinstance(r["completion"], str) and r["completion"] for r in records)
    rescored = score_generations(records, data_dir=str(data_dir))
    assert rescored["gsm8k"]["accuracy"] == accuracy and rescored["gsm8k"]["n"] == 2
