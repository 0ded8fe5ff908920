"""`loralab run` end to end on the real MiniLM encoder and real GLUE data: the loss falls, the
result JSON validates and is routed, the adapter loads with plain peft, Ctrl-C writes a cancelled result."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from peft import LoraConfig, PeftModel

from loralab.cli import main
from loralab.results import route, validate


def make(tmp_path, name, params, adapter=None):
    folder = tmp_path / "experiments" / "lora" / name
    folder.mkdir(parents=True)
    if adapter is not None:
        LoraConfig(**adapter).save_pretrained(folder)
    (folder / "training_parameters.json").write_text(json.dumps(params))
    return folder


@pytest.mark.slow
def test_short_run_lowers_loss_and_writes_valid_result(tmp_path, data_dir, monkeypatch):
    folder = make(
        tmp_path,
        "stsb-r8",
        {
            "task": "glue/stsb",
            "data_dir": str(data_dir),
            "max_train_samples": 160,  # 96 left pearson at 0.27-0.3+ depending on the data order
            "max_eval_samples": 64,
            "batch_size": 16,
            "num_epochs": 4,
            "learning_rate": 2e-3,
            "logging_steps": 3,
            "eval_steps": 12,
        },
        {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    )
    results_root = tmp_path / "res"
    monkeypatch.setenv("LORALAB_RESULTS_DIR", str(results_root))
    assert main(["run", str(folder)]) == 0
    files = list(results_root.rglob("*.json"))
    assert len(files) == 1 and files[0].parent.name == "temporary_results"  # a test tree is not a main run
    record = json.loads(files[0].read_text())
    assert validate(record) == []
    assert record["run_info"]["experiment_name"] == "lora/stsb-r8"
    assert record["run_info"]["config"]["training_parameters"]["learning_rate"] == 2e-3
    assert record["train_info"]["status"] == "success"
    losses = [m["train loss"] for m in record["train_info"]["metrics"] if "train loss" in m]
    assert losses[-1] < 0.5 * losses[0], losses
    assert set(record["eval"]) == {"pearson", "spearmanr", "loss"}  # loss: the dev MSE
    assert record["eval"]["pearson"] > 0.3  # a real regressor learned something on real STS-B
    assert any("eval pearson" in m for m in record["train_info"]["metrics"])
    assert record["meta_info"]["dataset"]["train"]["sha256"]
    # the saved adapter (with its trained regression head and pooler) loads with plain peft
    from loralab.models import load_model

    adapter = record["train_info"]["adapter_path"]
    base = load_model("packaged:minilm-l6", "seq_cls", 1)
    model = PeftModel.from_pretrained(base, adapter).eval()
    assert record["train_info"]["file_size"] > 0
    head = dict(model.named_parameters())
    assert any("pooler" in n and "modules_to_save" in n for n in head)


def test_routing_rules():
    clean_main = {"branch": "main", "dirty": False}
    assert route("success", clean_main).name == "results"
    assert route("success", {"branch": "main", "dirty": True}).name == "temporary_results"
    assert route("success", {"branch": "feature", "dirty": False}).name == "temporary_results"
    assert route("cancelled", clean_main).name == "cancelled_results"


@pytest.mark.slow
def test_sigint_writes_cancelled_result(tmp_path, data_dir):
    folder = make(
        tmp_path,
        "long",
        {"task": "glue/sst2", "data_dir": str(data_dir), "max_train_samples": 20000, "batch_size": 8, "num_epochs": 1},
        {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    )
    results_root = tmp_path / "res"
    env = {**os.environ, "LORALAB_RESULTS_DIR": str(results_root), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loralab", "run", "-v", str(folder)], stderr=subprocess.PIPE, text=True, env=env
    )
    seen = ""
    deadline = time.time() + 240
    while time.time() < deadline:
        chunk = proc.stderr.read(1)
        seen += chunk
        # at least 2 steps done: the bar may skip counts (tqdm's miniters), so any count >= 2, not "2/" itself
        bar = seen.split("train lora/long")[-1] if "train lora/long" in seen else ""
        if any(int(done) >= 2 for done in re.findall(r"(\d+)/\d+", bar)):
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen[-500:] + rest
    files = list((results_root / "cancelled_results").glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["train_info"]["status"] == "cancelled"
    assert record["train_info"]["steps"] >= 2
    assert record["eval"] == {}
