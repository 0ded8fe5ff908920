"""What an interrupted run keeps, and what its records say once resumed: a signal in the final
evaluation stops after the current evaluation (a second one at once) with the finished ones' metrics
in the cancelled record; ``--resume`` then neither trains again (a checkpoint marks training
complete) nor redoes an evaluation that finished on the same adapter bytes; a resumed record's
``total_time`` and ``train_time`` both count every part of the run (``run_info.resumed``) and its
``init_cost`` is the first part's; the history's ``lr`` is the rate each step's update used. Real
SmolLM2 (cut to 2 layers) on GSM8K, MATH and BoolQ rows; real MiniLM-L6 on GLUE rows."""

import json
import os
import signal
from pathlib import Path

import pytest
from test_resume import make  # an experiment folder under <root>/experiments

from loralab.cli import main


def newest(tmp_path: Path, status: str) -> dict:
    found = [json.loads(p.read_text()) for p in (tmp_path / "loralab-results").rglob("*.json")]
    found = [r for r in found if r["train_info"]["status"] == status]
    return max(found, key=lambda r: r["run_info"]["created_at"])


def assert_parts_add_up(record: dict, steps: list) -> list:
    """``run_info.resumed``: one part per process that saved something, whose times sum to the record's."""
    parts = record["run_info"]["resumed"]
    assert [p["steps"] for p in parts] == steps
    assert record["run_info"]["total_time"] == pytest.approx(sum(p["total_time"] for p in parts))
    assert record["train_info"]["train_time"] == pytest.approx(sum(p["train_time"] for p in parts))
    assert all(p["total_time"] >= p["train_time"] >= 0 for p in parts)
    assert record["run_info"]["total_time"] >= record["train_info"]["train_time"]
    return parts


@pytest.mark.slow
def test_signal_in_evaluation_keeps_finished_evaluations_and_resume_runs_only_the_rest(
        tmp_path, data_dir, smollm2_cut_path, monkeypatch, capsys):
    from loralab.tasks import evaluate as evals

    folder = make(tmp_path, "lora/gsm8k", {
        "model_id": smollm2_cut_path, "task": "gsm8k", "data_dir": str(data_dir), "max_train_samples": 4,
        "batch_size": 2, "max_steps": 2, "max_length": 64, "checkpoint_steps": 1, "logging_steps": 1,
        "eval_tasks": ["gsm8k", "math", "boolq"], "max_eval_samples": 2, "generation": {"max_new_tokens": 2},
        "device": "cpu"}, {"r": 2, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"})
    real, called, signals = evals.run_eval, [], {}

    def run_eval(name, *args, **kwargs):  # signals sent as an evaluation starts: {name: how many}
        called.append(name)
        for _ in range(signals.pop(name, 0)):
            os.kill(os.getpid(), signal.SIGINT)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(evals, "run_eval", run_eval)

    # one signal while math runs: acknowledged, math finishes, boolq does not start
    signals["math"] = 1
    assert main(["run", str(folder)]) == 130
    err = capsys.readouterr().err
    assert "evaluating gsm8k (2 examples), math (2 examples), boolq (2 examples)" in err  # not "gsm8k (6 examples)"
    assert "SIGINT: stopping after this evaluation" in err
    assert called == ["gsm8k", "math"]
    first = newest(tmp_path, "cancelled")
    assert first["train_info"]["error"]["phase"] == "evaluate"
    assert first["train_info"]["evaluations"] == {"ran": ["gsm8k", "math"], "reused": [], "not_run": ["boolq"]}
    assert sorted(first["eval"]) == ["gsm8k/accuracy", "gsm8k/n", "math/accuracy", "math/n"]
    (run_dir,) = (tmp_path / "loralab-outputs").iterdir()
    assert json.loads((run_dir / "checkpoints" / "step-2" / "state.json").read_text())["trained"]  # training complete

    # math's earlier result scored other adapter bytes: evaluated again; two signals as boolq starts: at once
    done = run_dir / "checkpoints" / "evaluated" / "math.json"
    done.write_text(json.dumps({**json.loads(done.read_text()), "adapter_sha256": "0" * 64}))
    called.clear()
    signals["boolq"] = 2
    assert main(["run", str(folder), "--resume"]) == 130
    err = capsys.readouterr().err
    assert "training had finished: the final adapter is restored, not trained again" in err
    assert "step 2/2" not in err and "math's earlier evaluation scored another adapter" in err
    assert called == ["math", "boolq"]
    second = newest(tmp_path, "cancelled")
    assert second["train_info"]["evaluations"] == {"ran": ["math"], "reused": ["gsm8k"], "not_run": ["boolq"]}
    assert sorted(second["eval"]) == sorted(first["eval"])

    called.clear()
    assert main(["run", str(folder), "--resume"]) == 0
    assert called == ["boolq"]  # neither training nor a finished evaluation again
    record = newest(tmp_path, "success")
    info = record["train_info"]
    assert info["evaluations"] == {"ran": ["boolq"], "reused": ["gsm8k", "math"], "not_run": []}
    assert info["steps"] == 2 and [m["step"] for m in info["metrics"] if "train loss" in m] == [1, 2]
    assert {k: v for k, v in record["eval"].items() if not k.startswith("boolq/")} == second["eval"]
    assert sorted(record["eval"]) == sorted([*first["eval"], "boolq/accuracy", "boolq/n"])
    generations = [json.loads(line)["task"] for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert generations == ["gsm8k"] * 2 + ["math"] * 2 + ["boolq"] * 2
    assert list(json.loads((run_dir / "evaluations.json").read_text())) == ["gsm8k", "math", "boolq"]
    parts = assert_parts_add_up(record, [[0, 2], [2, 2], [2, 2]])
    assert [p["evaluations"] for p in parts] == [["gsm8k"], ["math"], ["boolq"]]
    assert parts[0]["train_time"] == pytest.approx(info["train_time"])  # the first part trained; the others did not


@pytest.mark.slow
def test_resumed_record_counts_every_part_and_keeps_init_cost(tmp_path, data_dir, monkeypatch, capsys):
    """CorDA (IPA): the resumed process rebuilds from the saved init (no calibration, no decomposition), so only the
    checkpoint knows the init's cost and where its calibration rows came from."""
    from loralab.run.meter import Meter

    folder = make(tmp_path, "corda/rte", {
        "task": "glue/rte", "data_dir": str(data_dir), "max_train_samples": 24, "max_eval_samples": 4, "batch_size": 4,
        "max_steps": 6, "logging_steps": 1, "checkpoint_steps": 0, "calibration": {"num_samples": 8, "batch_size": 4}}, {
        "r": 2, "lora_alpha": 2, "target_modules": ["query", "value"], "init_lora_weights": "corda",
        "corda_config": {"corda_method": "ipm"}})
    real, fired = Meter.start, []

    def start(self, step_fn):
        if self.state["step"] == 2 and not fired:  # SIGINT during step 3: stops after it, with a checkpoint
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, step_fn)

    monkeypatch.setattr(Meter, "start", start)
    assert main(["run", str(folder)]) == 130
    cancelled = newest(tmp_path, "cancelled")
    assert cancelled["train_info"]["steps"] == 3 and cancelled["run_info"]["init_cost"]["seconds"] > 0
    # stopped in training: the record still names the evaluations that did not run
    assert cancelled["train_info"]["evaluations"] == {"ran": [], "reused": [], "not_run": ["glue/rte"]}
    assert main(["run", str(folder), "--resume"]) == 0
    record = newest(tmp_path, "success")
    assert record["train_info"]["resumed_from"].endswith("step-3")
    assert record["run_info"]["init_cost"] == cancelled["run_info"]["init_cost"]
    calibration = cancelled["meta_info"]["dataset"]["calibration"]
    assert calibration["source"] == "task" and calibration["split"] == "train" and calibration["num_samples"] == 8
    assert record["meta_info"]["dataset"]["calibration"] == calibration
    parts = assert_parts_add_up(record, [[0, 3], [3, 6]])
    # the peak is the whole run's: the largest any part reached (it was the last process's alone)
    assert all(isinstance(p["peak_memory"], int) for p in parts)
    assert record["train_info"]["peak_rss"] == max(p["peak_memory"] for p in parts) >= parts[0]["peak_memory"]
    assert parts[0]["total_time"] <= cancelled["run_info"]["total_time"]
    assert parts[0]["train_time"] == pytest.approx(cancelled["train_info"]["train_time"])
    capsys.readouterr()


def test_logged_lr_is_the_rate_each_step_used(tmp_path, data_dir):
    """Linear warm-up over 2 of 4 steps (transformers' schedule): step 1's update runs at lr 0, step 2's at
    half the rate, step 3's at the full rate, step 4's at half again."""
    folder = make(tmp_path, "lora/rte", {
        "task": "glue/rte", "data_dir": str(data_dir), "max_train_samples": 16, "max_eval_samples": 4, "batch_size": 4,
        "max_steps": 4, "learning_rate": 1e-3, "warmup_ratio": 0.5, "logging_steps": 1, "checkpoint_steps": 0},
        {"r": 2, "target_modules": ["query"]})
    assert main(["run", str(folder)]) == 0
    history = newest(tmp_path, "success")["train_info"]["metrics"]
    assert [(m["step"], m["lr"]) for m in history if "lr" in m] == [(1, 0.0), (2, 5e-4), (3, 1e-3), (4, 5e-4)]


def test_evaluations_are_named_with_their_counts(data_dir):
    """The opening of the final evaluation names each evaluation and what it scores, not the task's name and a sum."""
    from loralab.config import build_parameters
    from loralab.run import evaluation
    from loralab.tasks import get_task

    params = build_parameters({"task": "metamath", "model_id": "packaged:smollm2-135m", "data_dir": str(data_dir),
                               "eval_tasks": ["gsm8k", "math"], "max_eval_samples": 4})
    task = get_task("metamath")
    names = evaluation.names(task, params)
    assert evaluation.describe(evaluation.counts(task, None, params, names)) == "gsm8k (4 examples), math (4 examples)"
    glue = build_parameters({"task": "glue/rte"})
    assert evaluation.names(get_task("glue/rte"), glue) == ["glue/rte"]
