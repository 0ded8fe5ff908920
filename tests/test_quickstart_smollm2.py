"""The causal-LM quickstart end to end on CPU, as a user runs it: `loralab run
experiments/quickstart/lora-smollm2-gsm8k` (LoRA on SmolLM2-135M-Instruct, GSM8K train rows, a
short GSM8K test evaluation) exits 0 with a success record whose training loss went down and whose
GSM8K score is over the stated number of problems; the adapter loads with plain peft; the run writes
its generations once, and re-scoring them without a model gives the same accuracy.

This test also carries what the former tests/test_instruct_e2e.py checked on its own smaller SFT
run (the loss going down, the dataset's sha256, the recorded headline reaching the report,
evaluations.json's timing, re-scoring the saved generations), so the suite runs one SmolLM2 SFT
run end to end instead of two."""

import json
import os
from pathlib import Path

import pytest

from loralab.cli import main

FOLDER = Path(__file__).resolve().parents[1] / "experiments" / "quickstart" / "lora-smollm2-gsm8k"
GSM8K_TRAIN_SHA256 = "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"


@pytest.mark.slow
def test_causal_lm_quickstart(data_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loralab.models import resolve_model_path
    from loralab.report import build_report
    from loralab.tasks.evaluate import read_records, score_generations

    params = json.loads((FOLDER / "training_parameters.json").read_text())
    assert main(["run", str(FOLDER)]) == 0

    results = sorted(Path(os.environ["LORALAB_RESULTS_DIR"]).rglob("*.json"))
    assert len(results) == 1
    record = json.loads(results[0].read_text())
    steps = params["max_train_samples"] // params["batch_size"]
    assert record["train_info"]["status"] == "success" and record["train_info"]["steps"] == steps
    losses = [m["train loss"] for m in record["train_info"]["metrics"] if "train loss" in m]
    assert len(losses) == steps
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses  # the run learnt something
    assert record["meta_info"]["dataset"]["sha256"] == GSM8K_TRAIN_SHA256

    accuracy = record["eval"]["gsm8k/accuracy"]
    assert 0.0 <= accuracy <= 1.0 and record["eval"]["gsm8k/n"] == params["max_eval_samples"]
    # the headline the task recorded is the cell the report shows; the evaluation's timing is kept apart
    assert record["meta_info"]["dataset"]["headline"] == "gsm8k/accuracy"
    (table,) = build_report(results).tables
    assert next(iter(table.cells.values())).metric == "gsm8k/accuracy"
    outputs = Path(os.environ["LORALAB_OUTPUT_DIR"])
    full = json.loads(next(outputs.rglob("evaluations.json")).read_text())["gsm8k"]
    assert full["headline"] == "accuracy" and full["seconds"]["total"] > 0

    # one generations file per run, with every problem, and it re-scores to the recorded accuracy
    generations = sorted(outputs.rglob("*generations.jsonl"))
    assert [g.name for g in generations] == ["generations.jsonl"]
    saved = read_records(generations[0])
    assert [r["id"] for r in saved] == list(range(params["max_eval_samples"]))
    assert all(r["task"] == "gsm8k" and isinstance(r["completion"], str) and r["prompt"] for r in saved)
    rescored = score_generations(saved, data_dir=str(data_dir))["gsm8k"]
    assert rescored["accuracy"] == accuracy and rescored["n"] == params["max_eval_samples"]

    # the adapter is a plain peft adapter: it loads on the resolved base and is trained (lora_B moved from 0)
    (adapter,) = [p.parent for p in outputs.rglob("adapter_config.json") if p.parent.name == "adapter"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_path(params["model_id"])), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)
