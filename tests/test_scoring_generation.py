"""Issue 12, kinds 7 and 9: an explicit generation setting always wins over an evaluation's source
default, the effective settings go into the result, and generations carry their prompt."""

import json

import pytest

from loralab.cli import main
from loralab.config import TrainingParameters
from loralab.tasks import evaluate as evals
from loralab.tasks import get_task
from loralab.tasks.generation import BACKENDS, resolve_backend

UNSET = {"max_new_tokens": None, "batch_size": 16, "temperature": None, "top_p": None, "n_samples": None, "backend": "auto"}
GENERATIVE = [n for n, e in evals.EVALS.items() if e.output_type == "generate"]


@pytest.mark.parametrize("name", GENERATIVE)
def test_unset_keys_keep_every_source_protocol(name):
    options = evals.resolve_options(name, {})
    source = evals.EVALS[name].source_generation(name, options)
    settings = evals.generation_settings(name, UNSET, options)
    assert {k: getattr(settings, k) for k in source} == source


@pytest.mark.parametrize("name", GENERATIVE)
@pytest.mark.parametrize("key,value", [("max_new_tokens", 512), ("max_new_tokens", 1024), ("temperature", 0.0),
                                       ("top_p", 1.0), ("n_samples", 1), ("batch_size", 16)])
def test_an_explicit_value_wins_even_when_it_equals_a_global_default(name, key, value):
    """Issue 12: ``generation.max_new_tokens: 512`` was ignored for GSM8K (source: 1,024) because 512
    was also loralab's default. Every value that is set is applied, whatever it equals."""
    options = evals.resolve_options(name, {})
    settings = evals.generation_settings(name, {**UNSET, key: value}, options)
    assert getattr(settings, key) == value
    if key == "max_new_tokens":  # the explicit budget is the budget: a source's prompt-inclusive cap goes
        assert settings.max_length is None


def test_issue_12_input():
    options = evals.resolve_options("gsm8k", {})
    assert evals.generation_settings("gsm8k", {"max_new_tokens": 512}, options).max_new_tokens == 512
    assert evals.generation_settings("gsm8k", {}, options).max_new_tokens == 1024
    bigcode = evals.resolve_options("humaneval", {"sampling": "bigcode"})
    assert evals.generation_settings("humaneval", {"temperature": 0.0}, bigcode).temperature == 0.0  # greedy on purpose
    assert evals.generation_settings("humaneval", {}, bigcode).temperature == 0.2


def test_training_run_records_effective_settings_per_evaluation():
    """What the runner records (``TaskData.provenance["evaluations"]``, from ``evaluation_settings``)."""
    task = get_task("metamath")
    params = TrainingParameters(task="metamath", eval_tasks=["gsm8k", "humaneval"],
                                generation={**UNSET, "max_new_tokens": 512}, eval_options={"gsm8k": {"parser": "method_comparison"}})
    recorded = task.evaluation_settings(params)
    assert recorded["gsm8k"]["generation"]["max_new_tokens"] == 512
    assert recorded["gsm8k"]["options"]["parser"] == "method_comparison"
    assert recorded["humaneval"]["generation"]["max_new_tokens"] == 512
    assert recorded["humaneval"]["generation"]["stop"][0] == "\nclass"
    assert recorded["gsm8k"]["generation"]["backend"] in set(BACKENDS) - {"auto"}  # "auto" resolved
    assert (recorded["gsm8k"]["headline"], recorded["humaneval"]["headline"]) == ("accuracy", "pass@1")
    unset = task.evaluation_settings(TrainingParameters(task="metamath", eval_tasks=["gsm8k"], generation=dict(UNSET)))
    assert unset["gsm8k"]["generation"]["max_new_tokens"] == 1024
    json.dumps(recorded)  # goes into a JSON result as is


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(smollm2_path))


def test_live_results_hold_settings_and_records_hold_prompts(smollm2, data_dir, tmp_path):
    model, tokenizer = smollm2
    metrics, records = evals.run_eval("humaneval", model, tokenizer, data_dir=data_dir,
                                      generation={"max_new_tokens": 6, "batch_size": 2}, max_samples=2, out_dir=tmp_path)
    assert metrics["generation"]["max_new_tokens"] == 6 and metrics["generation"]["max_length"] is None
    assert metrics["generation"]["temperature"] == 0.0 and metrics["generation"]["backend"] == resolve_backend("auto")
    problems = evals.EVALS["humaneval"].load("humaneval", data_dir, 2)
    assert [r["prompt"] for r in records] == [p["prompt"].strip() for p in problems]
    saved = evals.read_records(tmp_path / "humaneval.generations.jsonl")
    assert saved == records
    rescored = evals.score_generations(saved, data_dir=data_dir)["humaneval"]
    assert evals.numeric(rescored) == evals.numeric(metrics)


def test_cli_output_holds_the_effective_settings(data_dir, tmp_path):
    out = tmp_path / "m.json"
    gens = tmp_path / "g.jsonl"
    assert main(["eval", "--model", "packaged:smollm2-135m", "--tasks", "gsm8k", "--max-samples", "1",
                 "--max-new-tokens", "4", "--data-dir", str(data_dir), "--output", str(out),
                 "--generations-out", str(gens)]) == 0
    result = json.loads(out.read_text())["gsm8k"]
    assert result["generation"]["max_new_tokens"] == 4
    assert result["generation"]["stop"] == ["Instruction:", "Instruction", "Response:", "Response"]
    row = evals.read_records(gens)[0]
    assert row["prompt"].startswith("Below is an instruction") and row["prompt"].endswith("Let's think step by step.")


def test_a_default_training_run_keeps_every_source_protocol():
    """With nothing set in an experiment, each evaluation runs under its source's protocol
    (GSM8K 1,024 tokens, commonsense 4 beams x 32 tokens, code 512 tokens prompt included)."""
    task = get_task("metamath")
    params = TrainingParameters(task="metamath", eval_tasks=["gsm8k", "boolq", "humaneval"])
    recorded = task.evaluation_settings(params)
    assert recorded["gsm8k"]["generation"]["max_new_tokens"] == 1024
    assert (recorded["boolq"]["generation"]["num_beams"], recorded["boolq"]["generation"]["max_new_tokens"]) == (4, 32)
    assert recorded["humaneval"]["generation"]["max_length"] == 512
