"""`loralab eval` and `GenerationSettings` input handling found by a newcomer's try of the engine
(issue 19): every bad value named before a model loads, a failing task does not lose the others,
group options, the recorded backend and why ``auto`` chose it."""

import json

import pytest

from loralab.cli import main
from loralab.tasks import evaluate
from loralab.tasks.generation import GenerationSettings


@pytest.mark.parametrize("argv, message", [
    (["--tasks", ""], "name at least one evaluation"),
    (["--tasks", ","], "name at least one evaluation"),
    (["--tasks", "gsm8k", "--temperature", "-1"], "--temperature = -1.0: must be >= 0"),
    (["--tasks", "gsm8k", "--top-p", "0"], "--top-p = 0.0: must be in (0, 1]"),
    (["--tasks", "gsm8k", "--top-k", "-2"], "--top-k = -2: must be >= 0"),
    (["--tasks", "gsm8k", "--slots", "0"], "--slots = 0: must be a positive whole number"),
])
def test_bad_values_are_named_before_any_model_loads(capsys, argv, message):
    assert main(["eval", "--model", "packaged:smollm2-135m", *argv]) == 2
    assert message in capsys.readouterr().err


def test_an_encoder_is_refused_for_generation(capsys, minilm_path):
    assert main(["eval", "--model", "packaged:minilm-l6", "--tasks", "gsm8k", "--max-samples", "1"]) == 2
    err = capsys.readouterr().err
    assert "not a causal language model" in err and "BertModel" in err


def test_settings_check_every_field_and_take_one_stop_string():
    assert GenerationSettings(stop="United").stop == ["United"]  # not its characters
    with pytest.raises(ValueError) as info:
        GenerationSettings(temperature=-1.0, slots=0, top_p=1.5, backend="vlm")
    text = str(info.value)
    for part in ("temperature = -1.0", "slots = 0", "top_p = 1.5", "backend = 'vlm'"):
        assert part in text


def test_group_options_reach_every_member():
    options = {"commonsense": {"num_beams": 1}, "boolq": {"num_beams": 2}}
    assert evaluate.validate_options(["commonsense"], options) == []
    assert evaluate.resolve_options("piqa", options)["num_beams"] == 1
    assert evaluate.resolve_options("boolq", options)["num_beams"] == 2  # the evaluation's own wins
    assert "num_beamz" in " ".join(evaluate.validate_options(["commonsense"], {"commonsense": {"num_beamz": 1}}))


def test_the_record_says_why_auto_did_not_pick_the_engine():
    beams = evaluate.generation_record(GenerationSettings(num_beams=4))
    assert beams["backend"] == "transformers" and "beam search" in beams["backend_reason"]
    assert "slots" not in beams and beams["batch_size"] == 16  # only the backend's own knobs
    greedy = evaluate.generation_record(GenerationSettings())
    assert greedy["backend"] == "engine" and "backend_reason" not in greedy and "batch_size" not in greedy


def test_a_failing_task_keeps_the_others(monkeypatch, tmp_path, capsys, data_dir):
    real = evaluate.run_eval

    def run_eval(name, *args, **kwargs):
        if name == "piqa":
            raise OSError("piqa's file is not in the data folder")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(evaluate, "run_eval", run_eval)
    out = tmp_path / "metrics.json"
    code = main(["eval", "--model", "packaged:smollm2-135m", "--tasks", "piqa,boolq", "--max-samples", "1",
                 "--max-new-tokens", "2", "--options", '{"commonsense": {"num_beams": 1}}', "--data-dir", str(data_dir),
                 "--output", str(out), "--generations-out", str(tmp_path / "gen.jsonl")])
    assert code == 1
    metrics = json.loads(out.read_text())
    assert metrics["piqa"] == {"error": "OSError: piqa's file is not in the data folder"}
    assert metrics["boolq"]["n"] == 1 and metrics["boolq"]["generation"]["backend"] == "engine"
    assert (tmp_path / "gen.jsonl").read_text().count('"task": "boolq"') == 1
    assert "1 of 2 evaluation(s) failed (piqa)" in capsys.readouterr().err


@pytest.mark.slow  # a short MiniLM run, then its adapter scored again
def test_a_glue_adapter_scores_as_its_run_recorded(tmp_path, data_dir, capsys):
    """``loralab eval --adapter DIR --tasks glue/stsb`` (the base named by the adapter, its trained regression head
    loaded with it) gives the dev correlations ``loralab run`` recorded for that adapter, on the same rows (a
    newcomer found GLUE adapters could not be scored again). STS-B: a continuous output, whose Pearson correlation
    another head (a fresh random one, say) would not reproduce, and one label, where the run's default is two."""
    from peft import LoraConfig

    folder = tmp_path / "experiments" / "lora" / "stsb"
    folder.mkdir(parents=True)
    LoraConfig(r=2, target_modules=["query", "value"]).save_pretrained(folder)
    (folder / "training_parameters.json").write_text(json.dumps(
        {"task": "glue/stsb", "max_train_samples": 32, "max_eval_samples": 48, "batch_size": 8, "max_steps": 4,
         "learning_rate": 5e-3, "data_dir": str(data_dir)}))
    assert main(["run", str(folder)]) == 0
    (path,) = (tmp_path / "loralab-results").rglob("*.json")
    record = json.loads(path.read_text())
    capsys.readouterr()
    out = tmp_path / "scores.json"
    assert main(["eval", "--adapter", record["train_info"]["adapter_path"], "--tasks", "glue/stsb", "--max-samples",
                 "48", "--data-dir", str(data_dir), "--output", str(out)]) == 0
    scores = json.loads(out.read_text())["glue/stsb"]
    assert scores["rows"] == 48 and scores["headline"] == "pearson"
    assert 0 < abs(record["eval"]["pearson"]) < 1
    for metric in ("pearson", "spearmanr"):
        assert scores[metric] == pytest.approx(record["eval"][metric], abs=1e-6), metric
    # its one-label head on a two-label task: that task fails, naming the label count, and the call exits 1
    capsys.readouterr()
    assert main(["eval", "--adapter", record["train_info"]["adapter_path"], "--tasks", "glue/rte", "--max-samples", "4",
                 "--data-dir", str(data_dir)]) == 1
    assert "error: glue/rte (2 label(s)): RuntimeError" in capsys.readouterr().err


def test_an_adapter_without_a_classification_head_is_refused_for_glue(tmp_path, capsys):
    from peft import LoraConfig

    LoraConfig(r=2, target_modules=["query"], task_type="CAUSAL_LM").save_pretrained(tmp_path)
    assert main(["eval", "--model", "packaged:minilm-l6", "--adapter", str(tmp_path), "--tasks", "glue/sst2"]) == 2
    assert "its task_type is CAUSAL_LM, not SEQ_CLS" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "glue/rte,gsm8k"], "score them in separate calls"),
    (["--tasks", "glue/rte", "--temperature", "0.5"], "--temperature steer generation"),
    (["--tasks", "glue/rte", "--generations", "x.jsonl"], "score a model's predictions"),
    (["--tasks", "glue/rte", "--options", '{"glue/rte": {"a": 1}}'], "--options names glue/rte, which takes no options"),
    (["--tasks", "glue/rte", "--generations-out", "g.jsonl"], "--generations-out steer generation"),
    (["--tasks", "gsm8k", "--max-length", "64"], "--max-length = 64: applies to GLUE tasks only"),
])
def test_glue_tasks_refuse_what_only_generation_takes(capsys, argv, message):
    model = [] if "--generations" in argv else ["--model", "packaged:minilm-l6"]
    assert main(["eval", *model, *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def no_model(monkeypatch):
    """``load_model`` fails the test: the command must stop before it."""
    import loralab.models

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(loralab.models, "load_model", load_model)


def test_a_glue_task_without_its_dev_file_stops_before_the_model_loads(tmp_path, data_dir, no_model, capsys):
    """Before: the model loaded, glue/sst2 was scored, then glue/rte failed (exit 1, a model load for nothing)."""
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_bytes((data_dir / "glue" / "SST-2" / "dev.tsv").read_bytes())
    assert main(["eval", "--model", "packaged:minilm-l6", "--tasks", "glue/sst2,glue/rte", "--max-samples", "4",
                 "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the dev data of 1 GLUE task(s) cannot be read (no model was loaded)" in err, err
    assert f"glue/rte: FileNotFoundError: [Errno 2] No such file or directory: '{tmp_path / 'glue' / 'RTE' / 'dev.tsv'}'" in err


def test_glue_data_from_an_unreachable_hub_is_exit_2_before_the_model_loads(monkeypatch, no_model, capsys):
    import loralab.models

    monkeypatch.delenv("LORALAB_DATA_DIR", raising=False)
    monkeypatch.setattr(loralab.models, "hub_offline_reason", lambda: "the Hugging Face Hub (test) is unreachable")
    assert main(["eval", "--model", "packaged:minilm-l6", "--tasks", "glue/sst2,glue/rte", "--max-samples", "4"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: the dev data of 2 GLUE task(s) cannot be read (no model was loaded):", lines
    assert lines[1] == ("  - glue/sst2: Unreachable: cannot fetch dataset 'nyu-mll/glue sst2': the Hugging Face Hub "
                        "(test) is unreachable")  # the advice that follows is said once, on the last line
    assert lines[2].startswith("  - glue/rte: Unreachable: cannot fetch dataset 'nyu-mll/glue rte'") and "Work offline" in lines[2]


def test_an_unreachable_task_mid_run_says_why_in_one_line(capsys):
    """A ``ConfigError`` (``Unreachable``) from one evaluation is reported by its first problem, not by the
    "has 1 problem(s):" header its message starts with, and the others still run (exit 1)."""
    from types import SimpleNamespace

    from loralab.commands import eval as eval_command
    from loralab.models import Unreachable

    def step(name):
        if name == "nq_open_lm_eval":
            raise Unreachable("dataset", "nq_open", "the Hugging Face Hub (test) is unreachable")
        return {"n": 1}, []

    args = SimpleNamespace(generations_out=None, output=None)
    assert eval_command._each(args, ["nq_open_lm_eval", "boolq"], step, main=True) == 1
    out, err = capsys.readouterr()
    why = "Unreachable: cannot fetch dataset 'nq_open': the Hugging Face Hub (test) is unreachable"
    assert json.loads(out)["nq_open_lm_eval"]["error"].startswith(why) and json.loads(out)["boolq"] == {"n": 1}
    assert f"error: nq_open_lm_eval: {why}" in err
