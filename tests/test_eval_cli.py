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
