"""Every generation row says why its completion ended (``loralab.tasks.finish``): ``finish_reason``
"stop" (``stop_reason``: the stop string matched or the EOS token) or "length" (the budget ran out),
and ``new_tokens``; the engine and the transformers backend give identical values on the same greedy
input (real SmolLM2-135M-Instruct, real GSM8K prompts with GSM8K's own stop strings, a budget short
enough that some rows run out, a chat question the model answers and ends with ``<|im_end|>``);
each sample of n_samples its own; the result's ``finish_reasons`` counts the rows; re-scoring keeps
the fields and says "unknown" for a file without them; code's "cut off" warning counts "length" rows."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from loralab.config import ConfigError
from loralab.engine import Engine
from loralab.tasks import evaluate as evals
from loralab.tasks.finish import finish_fields, row_ending
from loralab.tasks.generation import GenerationSettings, generate

BUDGET = 24
"""New tokens: GSM8K's step-by-step answers run past it; the chat answer ends within it."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores (see tests/test_engine.py)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(smollm2_path))


@pytest.fixture(scope="module")
def gsm8k_prompts(smollm2, data_dir) -> tuple[list[str], GenerationSettings]:
    """Three real GSM8K prompts and an easy chat question, GSM8K's settings (its stop strings) at ``BUDGET``."""
    _, tokenizer = smollm2
    ev, options = evals.EVALS["gsm8k"], evals.resolve_options("gsm8k", None)
    prompts = [ev.build_prompt("gsm8k", p, options) for p in ev.load("gsm8k", data_dir, 3)]
    prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2? Answer with one number."}],
                                                 tokenize=False, add_generation_prompt=True))
    return prompts, evals.generation_settings("gsm8k", {"max_new_tokens": BUDGET}, options)


def _run(model, tokenizer, prompts, settings, backend, **extra):
    finish, stats = [], {}
    out = generate(model, tokenizer, prompts, GenerationSettings(**{**settings.__dict__, "backend": backend, **extra}),
                   finish=finish, **({"stats": stats} if backend == "engine" else {}))
    return out, finish, stats


@pytest.mark.slow  # three greedy calls of each backend on the full model (~20 s here)
def test_engine_and_transformers_say_the_same_reason_for_each_row(smollm2, gsm8k_prompts):
    model, tokenizer = smollm2
    prompts, settings = gsm8k_prompts
    out, finish, stats = _run(model, tokenizer, prompts, settings, "engine")
    assert [f[0]["finish_reason"] for f in finish] == ["length", "stop", "length", "stop"], finish
    # a stop string that the first row's uncut text holds: that row now ends on it, the others as before
    extra_stop = out[0][0][20:28]
    stops = [*settings.stop, extra_stop]
    got = {backend: _run(model, tokenizer, prompts, settings, backend, stop=stops)
           for backend in ("engine", "transformers")}
    # transformers with a pad token that is no EOS: a row ended by a stop string is followed by padding
    padded = copy.deepcopy(tokenizer)
    padded.pad_token = "<|endoftext|>"
    assert padded.pad_token_id not in (tokenizer.eos_token_id, None)
    got["transformers, other pad"] = _run(model, padded, prompts, settings, "transformers", stop=stops)
    text, finish, stats = got["engine"]
    reasons = [(f[0]["finish_reason"], f[0]["stop_reason"]) for f in finish]
    assert reasons == [("stop", extra_stop), ("stop", "<|im_end|>"), ("length", None), ("stop", "<|im_end|>")], reasons
    for name, (other_text, other_finish, _) in got.items():
        assert other_text == text and other_finish == finish, name
    # new tokens: the budget where it ran out; in all, the engine's own counter (EOS not counted)
    assert finish[2][0]["new_tokens"] == BUDGET and all(f[0]["new_tokens"] < BUDGET for f in finish[:2])
    assert sum(f[0]["new_tokens"] for f in finish) == stats["new_tokens"]
    assert finish[3][0]["new_tokens"] == len(tokenizer(text[3][0], add_special_tokens=False)["input_ids"])


@pytest.mark.slow  # sampling on the full model (~5 s)
def test_each_sample_has_its_own_reason(smollm2, gsm8k_prompts, monkeypatch):
    model, tokenizer = smollm2
    prompts, settings = gsm8k_prompts
    tokens = []
    real = Engine.generate

    def recorded(self, *args, **kwargs):  # the engine's token ids of each sample
        tokens.append(real(self, *args, **kwargs))
        return tokens[-1]

    monkeypatch.setattr(Engine, "generate", recorded)
    chat = prompts[-1:]
    out, finish, _ = _run(model, tokenizer, chat, settings, "engine", temperature=1.5, n_samples=6, seed=3,
                          max_new_tokens=12)
    assert len(finish[0]) == 6
    assert [f["new_tokens"] for f in finish[0]] == [len(t) for t in tokens[0][0]]
    assert {f["finish_reason"] for f in finish[0]} == {"stop", "length"}, finish  # some samples end, some run out
    for f, t in zip(finish[0], tokens[0][0]):
        assert (f["finish_reason"] == "length") == (len(t) == 12 and f["stop_reason"] is None)


@pytest.mark.slow  # a live evaluation (~5 s)
def test_live_rows_and_the_result_count_the_same_length_rows(smollm2, data_dir, tmp_path):
    model, tokenizer = smollm2
    metrics, records = evals.run_eval("gsm8k", model, tokenizer, data_dir=data_dir, max_samples=3,
                                      generation={"max_new_tokens": 12, "n_samples": 2, "temperature": 1.0},
                                      out_dir=tmp_path)
    saved = [json.loads(line) for line in (tmp_path / "gsm8k.generations.jsonl").read_text().splitlines()]
    assert saved == records and len(records) == 6
    assert all(r["finish_reason"] in ("stop", "length") and isinstance(r["new_tokens"], int) for r in records)
    length = sum(r["finish_reason"] == "length" for r in records)
    assert metrics["finish_reasons"] == {"stop": 6 - length, "length": length} and length > 0
    assert "finish_reasons" not in evals.numeric(metrics)  # a count of rows, not a score
    # re-scoring keeps why each row ended
    rescored = evals.score_generations(records, data_dir=data_dir)["gsm8k"]
    assert rescored["finish_reasons"] == metrics["finish_reasons"]


# --- no model: the rule, the transformers rows, re-scoring ------------------------------------------

def test_the_rule_a_stop_string_then_the_eos_then_the_budget():
    stops = ["\n\n", "Question:"]
    assert finish_fields("a\n\nQuestion: b", stops, "<|im_end|>", 9) == \
        {"finish_reason": "stop", "stop_reason": "\n\n", "new_tokens": 9}  # the earliest in the text, as cut
    assert finish_fields("a Question: b\n\n", stops, None, 9)["stop_reason"] == "Question:"
    assert finish_fields("a", stops, "<|im_end|>", 1) == {"finish_reason": "stop", "stop_reason": "<|im_end|>",
                                                          "new_tokens": 1}
    assert finish_fields("a b", stops, None, 5) == {"finish_reason": "length", "stop_reason": None, "new_tokens": 5}


def test_a_transformers_row_counts_as_the_engine_does():
    eos, pad = {2}, 0
    assert row_ending([5, 6, 2, 2, 2], eos, None, None) == (2, 2)  # the EOS ends it, not counted
    assert row_ending([5, 6, 7, 0, 0], eos, 3, None) == (3, None)  # stopped at a stop string, padding after
    assert row_ending([5, 6, 7, 2, 2], eos, 3, None) == (3, None)  # padding that is the EOS
    assert row_ending([5, 2, 7, 0], eos, 3, None) == (1, 2)  # an EOS before the stop was seen
    assert row_ending([5, 6, 7], eos, 9, None) == (3, None)  # seen past this row's budget (max_length)
    assert row_ending([5, 6, 0, 0], eos, None, pad) == (2, None)  # beam search: trailing padding
    assert row_ending([5, 6, 7, 8], eos, None, None) == (4, None)


def test_rescoring_an_old_file_says_unknown_and_keeps_a_new_files_reasons(tmp_path, data_dir, capsys):
    from loralab.cli import main

    old = [{"task": "gsm8k", "id": 0, "completion": "The answer is: 18"},
           {"task": "gsm8k", "id": 1, "completion": "The answer is"}]
    new = [{**old[0], "finish_reason": "stop", "stop_reason": "\n\n", "new_tokens": 7},
           {**old[1], "finish_reason": "length", "stop_reason": None, "new_tokens": 12}]
    assert evals.score_generations(old, data_dir=data_dir)["gsm8k"]["finish_reasons"] == \
        {"stop": 0, "length": 0, "unknown": 2}
    assert evals.score_generations(new, data_dir=data_dir)["gsm8k"]["finish_reasons"] == {"stop": 1, "length": 1}
    for name, rows in (("old", old), ("new", new)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / f"{name}-out.jsonl"
        assert main(["eval", "--tasks", "gsm8k", "--generations", str(path), "--generations-out", str(out), "--data-dir", str(data_dir)]) == 0
        written = [json.loads(line) for line in out.read_text().splitlines()]
        kept = [{k: r.get(k) for k in ("finish_reason", "stop_reason", "new_tokens")} for r in written]
        expected = ([{"finish_reason": "unknown", "stop_reason": None, "new_tokens": None}] * 2 if name == "old" else
                    [{k: r[k] for k in ("finish_reason", "stop_reason", "new_tokens")} for r in new])
        assert kept == expected, name
        assert [r["correct"] for r in written] == [True, False]


def test_a_bad_finish_field_is_named_with_what_is_allowed(data_dir):
    rows = [{"task": "gsm8k", "id": 0, "completion": "18", "finish_reason": "eos", "new_tokens": -1}]
    with pytest.raises(ConfigError) as err:
        evals.score_generations(rows, data_dir=data_dir)
    text = str(err.value)
    assert "'finish_reason' = 'eos'" in text and "stop, length, unknown" in text
    assert "'new_tokens' = -1" in text and "whole number >= 0" in text


def test_rescored_code_rows_that_ran_out_are_blamed_on_the_budget(data_dir):
    import gzip

    with gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as fh:
        problems = [json.loads(next(fh)) for _ in range(2)]
    rows = [{"task": "humaneval", "id": p["task_id"], "completion": "\n    return (", "prompt": p["prompt"],
             "finish_reason": reason, "stop_reason": None, "new_tokens": 4}
            for p, reason in zip(problems, ("length", "length"))]
    (warning,) = evals.score_generations(rows, data_dir=data_dir)["humaneval"]["warnings"]
    assert "2 of them are completions that reached the max_new_tokens budget" in warning
    rows[1]["finish_reason"] = "stop"
    (warning,) = evals.score_generations(rows, data_dir=data_dir)["humaneval"]["warnings"]
    assert "1 of them are completions that reached the max_new_tokens budget" in warning
