"""`loralab eval` and its numbers, as a researcher checking them found them (trust problems 1-8):
every generation row says what the scorer decided; a partial generations file says it is partial;
bad re-score input is named, never a traceback; the code warning names the cause that fits; missing
data is found before the model loads and a failing evaluation keeps the others; an interrupted call
writes what finished; bad option values stop at the configuration check; counts print as integers."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loralab.cli import main
from loralab.tasks import code, evaluate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(smollm2_path))


@pytest.fixture(scope="module")
def humaneval(data_dir):
    with gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- 1. every row carries the scorer's verdict ----------------------------------------------------

@pytest.mark.slow  # generates with SmolLM2 (3-20 s on a shared 2-core machine)
def test_live_rows_carry_the_verdict_and_rescoring_them_recomputes_it(smollm2, data_dir):
    model, tokenizer = smollm2
    metrics, records = evaluate.run_eval("gsm8k", model, tokenizer, data_dir=data_dir, max_samples=2,
                                         generation={"max_new_tokens": 3})
    gold = [18.0, 3.0]  # rows 0 and 1 of GSM8K test
    assert [r["reference"] for r in records] == gold
    assert all(set(r) >= {"answer", "reference", "correct"} for r in records)
    assert sum(r["correct"] for r in records) / 2 == metrics["accuracy"]
    # the verdict fields are ignored on input: a row claiming "correct" is scored on its completion
    forged = [{**r, "correct": True, "answer": 18.0} for r in records]
    assert evaluate.score_generations(forged, data_dir=data_dir)["gsm8k"]["accuracy"] == metrics["accuracy"]


def test_rescored_rows_written_with_each_familys_verdict(tmp_path, data_dir, humaneval, capsys):
    from loralab.tasks import competition_math

    (math_problem,) = competition_math.load("math500", data_dir, 1)
    gold_math = competition_math.gold_answer(math_problem["solution"])
    rows = [
        {"task": "gsm8k", "id": 0, "completion": "So 16 - 3 - 4 = 9 eggs sold, 9 * 2 = 18.\nThe answer is: 18"},
        {"task": "gsm8k", "id": 1, "completion": "no answer given"},
        {"task": "math500", "id": math_problem["id"], "completion": f"The answer is: {gold_math}"},
        {"task": "boolq", "id": 0, "completion": "the correct answer is true"},
        {"task": "nq_open", "id": 0, "completion": " nobody"},
        {"task": "humaneval", "id": "HumanEval/0", "completion": "\n" + humaneval[0]["canonical_solution"],
         "prompt": humaneval[0]["prompt"]},
        {"task": "humaneval", "id": "HumanEval/1", "completion": "\n    return []\n"},
    ]
    out = tmp_path / "verdicts.jsonl"
    code_ = main(["eval", "--tasks", "gsm8k,math500,boolq,nq_open,humaneval", "--generations",
                  str(_write(tmp_path / "g.jsonl", rows)), "--generations-out", str(out), "--data-dir", str(data_dir)])
    assert code_ == 0
    got = {(r["task"], str(r["id"])): r for r in _rows(out)}
    assert got["gsm8k", "0"] == {**rows[0], "answer": 18.0, "reference": 18.0, "correct": True,
                                 "finish_reason": "unknown", "stop_reason": None, "new_tokens": None}  # an old row
    assert (got["gsm8k", "1"]["answer"], got["gsm8k", "1"]["correct"]) == (None, False)
    assert (got["math500", math_problem["id"]]["reference"], got["math500", math_problem["id"]]["correct"]) == (gold_math, True)
    boolq = got["boolq", "0"]
    assert boolq["answer"] == "true" and boolq["correct"] == (boolq["reference"] == "true")
    assert got["nq_open", "0"]["correct"] is False and isinstance(got["nq_open", "0"]["reference"], list)
    assert {k: got["humaneval", "HumanEval/0"][k] for k in ("passed", "status")} == {"passed": True, "status": "passed"}
    assert "error" not in got["humaneval", "HumanEval/0"]
    wrong = got["humaneval", "HumanEval/1"]
    assert (wrong["passed"], wrong["status"], wrong["error"]) == (False, "failed", "AssertionError")


# --- 2. a partial file says so; --max-samples counts; an asked task needs rows ----------------------

def test_a_partial_generations_file_is_reported_and_max_samples_is_honoured(tmp_path, data_dir, humaneval, capsys):
    rows = [{"task": "humaneval", "id": p["task_id"], "completion": p["canonical_solution"], "prompt": p["prompt"]}
            for p in (humaneval[0], humaneval[10])]
    gens = _write(tmp_path / "g.jsonl", rows)
    out = tmp_path / "m.json"
    assert main(["eval", "--tasks", "humaneval", "--generations", str(gens), "--output", str(out)]) == 0
    result = json.loads(out.read_text())["humaneval"]
    assert (result["n"], result["pass@1"]) == (2, 1.0)
    assert result["coverage"] == {"scored": 2, "problems": 164}
    assert "only 2 of the 164 problems asked for" in capsys.readouterr().err
    # the first 11 problems asked for: HumanEval/0 and /10 are 2 of them
    assert main(["eval", "--tasks", "humaneval", "--generations", str(gens), "--output", str(out),
                 "--max-samples", "11"]) == 0
    assert json.loads(out.read_text())["humaneval"]["coverage"] == {"scored": 2, "problems": 164, "max_samples": 11}
    assert "only 2 of the 11 problems asked for" in capsys.readouterr().err
    # the first problem only: HumanEval/10 is left out, and no warning
    assert main(["eval", "--tasks", "humaneval", "--generations", str(gens), "--output", str(out),
                 "--max-samples", "1"]) == 0
    assert json.loads(out.read_text())["humaneval"]["n"] == 1
    err = capsys.readouterr().err
    assert "warning" not in err and "1 row(s) past the first 1 problems" in err
    # a task asked for without a row: exit 2, naming what the file holds
    assert main(["eval", "--tasks", "gsm8k", "--generations", str(gens), "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "gsm8k: the generations file has no row for it; it holds humaneval (2 row(s))" in err


# --- 3. re-score input: bigcode's format read, bad rows named --------------------------------------

def test_bigcodes_generations_json_is_read(tmp_path, humaneval):
    """bigcode saves prompt.strip() + completion, one list per problem in dataset order."""
    programs = [[p["prompt"].strip() + "\n" + p["canonical_solution"], p["prompt"].strip() + "\n    pass\n"]
                for p in humaneval[:3]]
    gens = tmp_path / "generations.json"
    gens.write_text(json.dumps(programs))
    out, rows = tmp_path / "m.json", tmp_path / "rows.jsonl"
    assert main(["eval", "--tasks", "humaneval", "--generations", str(gens), "--output", str(out),
                 "--generations-out", str(rows)]) == 0
    result = json.loads(out.read_text())["humaneval"]
    assert (result["n"], result["programs"], result["pass@1"]) == (3, 6, 0.5)
    first = _rows(rows)[0]
    assert first["prompt"] == humaneval[0]["prompt"].strip() and first["passed"] is True


@pytest.mark.parametrize("content, said", [
    ('{"task": "humaneval", "id": "HumanEval/0"}\n', "line 1: no 'completion'"),
    ('{"task": "humaneval", "id": "HumanEval/0", "completion": "x"}\n{"task": "humaneval", "id": "HumanEval/999", '
     '"completion": "x"}\n', "line 2: id 'HumanEval/999' is not a humaneval problem"),
    ('\n{"task": "humaneval", "id": "HumanEval/0", "completion": 5}\n', "line 2: 'completion' = 5 is not allowed"),
    ('{"task": "humaneval", "id": "HumanEval/0", "completion": "x"}\nnot json\n', "line 2: not JSON"),
    ('[["x"], 5]', "problem 2: 5 must be a list of strings"),
], ids=["no completion", "unknown id", "bad type", "not json", "bigcode bad entry"])
def test_bad_rescore_input_is_one_line_each_and_exit_2(tmp_path, capsys, content, said):
    gens = tmp_path / "g.jsonl"
    gens.write_text(content)
    assert main(["eval", "--tasks", "humaneval", "--generations", str(gens)]) == 2
    err = capsys.readouterr().err
    assert f"{gens} {said}" in err and "Traceback" not in err


# --- 4. the code warning names the cause that fits --------------------------------------------------

@pytest.mark.slow  # generates with SmolLM2
def test_truncated_live_programs_are_blamed_on_the_token_budget(smollm2, data_dir):
    model, tokenizer = smollm2
    metrics, records = evaluate.run_eval("humaneval", model, tokenizer, data_dir=data_dir, max_samples=1,
                                         generation={"max_new_tokens": 8, "n_samples": 2})
    (warning,) = metrics["warnings"]
    assert "2 of them are completions that reached the max_new_tokens budget" in warning
    assert "another harness's protocol" not in warning and '"prompt"' not in warning
    assert all(r["status"] == "failed" and r["error"].startswith("SyntaxError") for r in records)


def test_rows_with_prompts_that_do_not_compile_are_not_called_a_protocol_mismatch(data_dir, humaneval):
    rows = [{"task": "humaneval", "id": p["task_id"], "completion": "\n    return (", "prompt": p["prompt"]}
            for p in humaneval[:2]]
    (warning,) = evaluate.score_generations(rows, data_dir=data_dir)["humaneval"]["warnings"]
    assert "not a protocol mismatch" in warning and "another harness's protocol" not in warning
    assert code.protocol_warning("humaneval", 4, 3, without_prompt=3).count("another harness's protocol") == 1


# --- 5. data found before the model loads; a failing evaluation keeps the others ---------------------

def test_missing_data_is_named_before_the_model_loads(tmp_path, data_dir, monkeypatch, capsys):
    own = tmp_path / "data"
    (own / "llm-adapters" / "dataset" / "boolq").mkdir(parents=True)
    (own / "llm-adapters" / "dataset" / "boolq" / "test.json").write_text(
        (data_dir / "llm-adapters" / "dataset" / "boolq" / "test.json").read_text())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a hub that refuses at once
    out = tmp_path / "m.json"
    assert main(["eval", "--model", "packaged:smollm2-135m", "--tasks", "boolq,hellaswag,gsm8k", "--max-samples", "2",
                 "--data-dir", str(own), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the data of 2 evaluation(s) cannot be found" in err and "boolq:" not in err  # nothing generated
    assert f"hellaswag: {own}/llm-adapters/dataset/hellaswag/test.json is not there" in err and "Rowan/hellaswag" in err
    assert f"gsm8k: {own}/gsm8k/test.jsonl is not there" in err and "openai/gsm8k" in err
    assert not out.exists()


@pytest.mark.slow  # loads SmolLM2 through the command line
def test_an_evaluation_failing_mid_call_keeps_the_others(tmp_path, data_dir, capsys):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:  # the failure used: the lm-eval bridge without lm-eval
        pytest.skip("lm-eval is installed here: the bridge would run")
    out = tmp_path / "m.json"
    assert main(["eval", "--model", "packaged:smollm2-135m", "--tasks", "boolq,nq_open_lm_eval", "--max-samples", "1",
                 "--max-new-tokens", "2", "--options", '{"boolq": {"num_beams": 1}}', "--data-dir", str(data_dir),
                 "--output", str(out)]) == 1
    metrics = json.loads(out.read_text())
    assert metrics["boolq"]["n"] == 1 and metrics["nq_open_lm_eval"]["error"].startswith("ImportError")
    assert "1 of 2 evaluation(s) failed (nq_open_lm_eval)" in capsys.readouterr().err


# --- 6. an interrupted call writes what finished ---------------------------------------------------

@pytest.mark.slow  # a real `loralab eval` process, stopped by a signal while it generates its second task
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_writes_the_finished_evaluations(tmp_path, data_dir, sig):
    out = tmp_path / "m.json"
    env = {**os.environ, "LORALAB_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loralab", "eval", "--model", "packaged:smollm2-135m", "--tasks", "boolq,gsm8k",
         "--max-samples", "boolq=1,gsm8k=64", "--max-new-tokens", "boolq=2,gsm8k=1024", "--options",
         '{"boolq": {"num_beams": 1}}', "--output", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # boolq's line: it finished, gsm8k is generating now
        seen.append(line)
        if line.startswith("boolq: {") or time.monotonic() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, "".join(seen) + rest
    written = json.loads(out.read_text())
    assert written["boolq"]["n"] == 1 and "gsm8k" not in written
    assert written["interrupted"] == {"signal": sig.name, "finished": ["boolq"], "unfinished": ["gsm8k"]}
    assert f"interrupted by {sig.name}" in rest


# --- 7. option values checked where option names are ------------------------------------------------

def test_option_values_are_checked_with_the_names():
    problems = evaluate.validate_options(["commonsense", "humaneval"], {
        "commonsense": {"num_beams": "four"}, "humaneval": {"ks": [0], "timeout": -1, "include_test_setup": 1}})
    assert problems == [
        "eval option 'commonsense.num_beams' = 'four' is not allowed for commonsense's evaluations; allowed: a whole "
        "number >= 1 (1: greedy)",
        "eval option 'humaneval.ks' = [0] is not allowed for humaneval; allowed: a non-empty list of whole numbers "
        ">= 1, e.g. [1, 10, 100]",
        "eval option 'humaneval.timeout' = -1 is not allowed for humaneval; allowed: a number of seconds > 0",
        "eval option 'humaneval.include_test_setup' = 1 is not allowed for humaneval; allowed: True, False",
    ]
    assert evaluate.validate_options(["commonsense", "humaneval", "ptb"], {
        "num_beams": 1, "humaneval": {"ks": [1, 10], "timeout": 2}, "ptb": {"stride": None}}) == []


def test_every_option_without_listed_values_has_a_rule():
    from loralab.tasks.option_rules import RULES

    free = {key for ev in evaluate.EVALS.values() for key, (_, allowed) in ev.options.items() if allowed is None}
    assert free <= set(RULES), free - set(RULES)
    for ev in evaluate.EVALS.values():  # every default passes its own check
        assert evaluate.validate_options([ev.name], {ev.name: {k: d for k, (d, _) in ev.options.items()}}) == []


def test_loralab_run_stops_at_a_bad_option_value(tmp_path, data_dir, capsys):
    folder = tmp_path / "experiments" / "bad-beams"
    folder.mkdir(parents=True)
    (folder / "training_parameters.json").write_text(json.dumps(
        {"task": "gsm8k", "model_id": "packaged:smollm2-135m", "data_dir": str(data_dir), "max_steps": 1,
         "eval_tasks": ["boolq"], "eval_options": {"commonsense": {"num_beams": "four"}}}))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    assert main(["run", str(folder)]) == 2
    assert "eval option 'commonsense.num_beams' = 'four' is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "loralab-results").exists()


# --- 8. counts print as integers --------------------------------------------------------------------

def test_counts_print_as_integers():
    from loralab.tasks.evaluate import format_metric

    assert format_metric("humaneval/programs", 4) == "4"
    assert format_metric("boolq/n", 3270.0) == "3270"
    assert format_metric("humaneval/timed_out", 0.0) == "0"
    assert format_metric("gsm8k/accuracy", 0.1) == "0.1000"
    assert format_metric("degenerate", ["x"]) == "['x']"


# --- where each evaluation's data is looked for ----------------------------------------------------

def test_every_evaluation_with_data_names_where_it_is(data_dir):
    from loralab.tasks.data_check import SOURCES

    with_data = {n for n, e in evaluate.EVALS.items() if e.output_type in ("generate", "perplexity")}
    assert with_data == set(SOURCES)
    assert [n for n, (path, _) in SOURCES.items() if not (data_dir / path).exists()] == ["hellaswag"]
