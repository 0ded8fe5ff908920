"""Live generation with a real decoder (SmolLM2-135M-Instruct) and re-scoring of saved generations."""

import json

import pytest

from loralab.cli import main
from loralab.tasks import evaluate as evals
from loralab.tasks.eval_output import task_metrics
from loralab.tasks.generation import GenerationSettings, generate, truncate_at_stop


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    return model, tokenizer


def test_truncate_at_stop():
    assert truncate_at_stop("a\nResponse: b\nInstruction", ["Instruction", "Response"]) == "a\n"
    assert truncate_at_stop("no stop here", ["\ndef"]) == "no stop here"


def test_left_padded_batches_match_single_prompts(smollm2, data_dir):
    model, tokenizer = smollm2
    problems = evals.EVALS["gsm8k"].load("gsm8k", data_dir, 2)  # prompts of different lengths
    prompts = [evals.EVALS["gsm8k"].build_prompt("gsm8k", p, {"prompt": "corda"}) for p in problems]
    batched = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=4, batch_size=2))
    single = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=4, batch_size=1))
    assert batched == single
    assert all(len(c) == 1 for c in batched) and any(c[0] for c in batched)


def test_live_run_equals_rescoring_of_saved_generations(smollm2, data_dir, tmp_path):
    model, tokenizer = smollm2
    generation = {"max_new_tokens": 6, "batch_size": 3}
    live = {}
    records = []
    for name in ("gsm8k", "boolq"):
        metrics, recs = evals.run_eval(name, model, tokenizer, data_dir=data_dir, generation=generation,
                                       options={"boolq": {"num_beams": 1}}, max_samples=3, out_dir=tmp_path)
        live[name] = metrics
        records += recs
        assert (tmp_path / f"{name}.generations.jsonl").exists()
    assert {(r["task"], r["id"]) for r in records} == {(t, i) for t in ("gsm8k", "boolq") for i in range(3)}
    # a completion that is correct by construction proves the scorer counts it
    records.append({"task": "gsm8k", "id": 4, "completion": "The answer is: 20"})  # gold of row 4 is 20
    rescored = evals.score_generations(records, data_dir=data_dir)
    assert evals.numeric(rescored["boolq"]) == evals.numeric(live["boolq"])
    assert live["gsm8k"]["headline"] == rescored["gsm8k"]["headline"] == "accuracy"
    assert set(live["gsm8k"]["seconds"]) == {"load", "generate", "score", "total"}
    assert live["gsm8k"]["seconds"]["total"] >= live["gsm8k"]["seconds"]["generate"] > 0
    assert rescored["gsm8k"]["n"] == 4
    assert rescored["gsm8k"]["accuracy"] == pytest.approx((live["gsm8k"]["accuracy"] * 3 + 1) / 4)

    # the command line re-scores the files the live run wrote, with no model
    saved = tmp_path / "all.jsonl"
    saved.write_text("".join((tmp_path / f"{n}.generations.jsonl").read_text() for n in ("gsm8k", "boolq")))
    out = tmp_path / "metrics.json"
    assert main(["eval", "--tasks", "gsm8k,boolq", "--generations", str(saved), "--output", str(out), "--data-dir", str(data_dir)]) == 0
    written = task_metrics(json.loads(out.read_text()))  # the evaluations, without meta_info (what was scored)
    assert {t: evals.numeric(m) for t, m in written.items()} == {t: evals.numeric(m) for t, m in live.items()}


def test_cli_rejects_bad_arguments(capsys):
    assert main(["eval", "--tasks", "gsm8kk", "--generations", "x.jsonl"]) == 2
    assert "did you mean 'gsm8k'" in capsys.readouterr().err
    assert main(["eval", "--tasks", "gsm8k"]) == 2
