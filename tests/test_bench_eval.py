"""`loralab bench --eval`: the generation bench on a tiny random llama on CPU, its token counts, the
decode-step bound and the command line's checks."""

import json

import pytest

from loralab.bench.generation_rows import Workload, tokens_to_end
from loralab.bench.generation_table import CARDS, decode_bound, table
from loralab.cli import main

FIELDS = {"row", "prompts", "new_tokens", "seconds", "tokens_per_s", "full_task_seconds", "peak_gib",
          "extrapolated", "all_to_budget", "token_count"}


def _bench(tmp_path, data_dir, *flags):
    out = tmp_path / "eval-bench.json"
    argv = ["bench", "--eval", "--model", "tiny-llama", "--device", "cpu", "--data-dir", str(data_dir),
            "--output", str(out), *flags]
    assert main(argv) == 0
    return json.loads(out.read_text())


@pytest.mark.slow  # ~20 s on 2 shared cores
def test_engine_and_transformers_rows_run_every_request_to_its_budget(tmp_path, data_dir, capsys):
    report = _bench(tmp_path, data_dir, "--rows", "engine,transformers", "--num-prompts", "5", "--max-new-tokens", "7",
                    "--batch-sizes", "2,4", "--slots", "3", "--rank", "4")
    assert report["workload"]["stopping"] == "budget" and report["workload"]["stop"] == [] and report["workload"]["eos"] == []
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"engine", "transformers"}
    for name, row in rows.items():
        assert "skipped" not in row, row
        assert set(row) >= FIELDS, name
        # random weights, no stop strings, EOS off: exactly prompts x budget new tokens, counted from token ids
        assert row["new_tokens"] == 5 * 7 and row["all_to_budget"] and row["token_count"] == "returned token ids"
        assert row["tokens_per_s"] > 0 and row["extrapolated"] is False and row["peak_gib"] is None
    assert rows["engine"]["retokenized"] == 0
    assert [c["batch_size"] for c in rows["transformers"]["candidates"]] == [2, 4]
    assert rows["transformers"]["batch_size"] in (2, 4)
    meta = report["meta"]
    assert meta["device"] == "cpu" and meta["command"].startswith("loralab bench --eval --model random:tiny-llama")
    assert set(meta["package_info"]) >= {"torch", "transformers", "peft"}
    assert meta["git"]["source"] == "measured" and meta["git"]["commit"] not in (None, False)  # this checkout has .git
    assert report["bound"]["card"] is None  # no card constants for a CPU
    printed = capsys.readouterr().out
    assert "| engine | 5 | 35 |" in printed and "| transformers | 5 | 35 |" in printed


@pytest.fixture
def one_gib_free(monkeypatch):
    """transformers sizes ``generate_batch``'s paged cache on a CPU from the whole machine's RAM
    (``max_memory_percent`` of what the process does not hold) and zero-fills it: on a 23 GiB machine
    that was ~16 s of this test's ~20 s, and more on a larger one. The row's token counts do not
    depend on the cache's capacity, so the CPU reports 1 GiB free beyond what this process holds."""
    from transformers.generation.continuous_batching import cache

    real = cache.get_device_and_memory_breakdown

    def one_gib_more(*args, **kwargs):
        device, total, reserved, allocated = real(*args, **kwargs)
        if device.type == "cpu":
            total = min(total, max(reserved, allocated) + 2**30)
        return device, total, reserved, allocated

    monkeypatch.setattr(cache, "get_device_and_memory_breakdown", one_gib_more)


@pytest.mark.slow
def test_generate_batch_row_counts_its_tokens(tmp_path, data_dir, one_gib_free):
    report = _bench(tmp_path, data_dir, "--rows", "generate_batch", "--num-prompts", "3", "--max-new-tokens", "5",
                    "--peer-prompts", "2", "--rank", "4")
    row = report["rows"][0]
    if "skipped" in row:  # transformers without continuous batching: a reason, not a crash
        assert row["skipped"]
        return
    assert row["new_tokens"] == 2 * 5 and row["all_to_budget"] and row["extrapolated"]
    assert row["full_task_seconds"] == pytest.approx(row["seconds"] * 3 / 2)


def test_tokens_to_end_stops_at_eos_stop_string_or_budget(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    ids = tokenizer(" Two plus two is four.\n### Instruction: more", add_special_tokens=False)["input_ids"]
    upto = len(tokenizer(" Two plus two is four.\n### Instruction", add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    source = Workload(["p"], [[1]], budget=100, stop=["Instruction"], eos=[eos])
    assert tokens_to_end(ids, tokenizer, source) == upto  # the token completing the stop string counts
    assert tokens_to_end(ids[:3] + [eos] + ids[3:], tokenizer, source) == 4  # EOS counts, nothing after it
    assert tokens_to_end(ids, tokenizer, Workload(["p"], [[1]], budget=3)) == 3
    assert tokens_to_end(ids, tokenizer, Workload(["p"], [[1]], budget=100)) == len(ids)


def test_decode_bound_on_an_h200_is_the_lower_of_memory_and_compute():
    from loralab.models import load_model

    model = load_model("random:tiny-llama", "causal_lm")
    bound = decode_bound(model, "NVIDIA H200", slots=8, context=100)
    card = CARDS["H200"]
    step_bytes = bound["weight_bytes"] + 8 * 100 * bound["kv_bytes_per_token"]
    assert bound["memory_bound_tokens_per_s"] == pytest.approx(8 * card.hbm_usable / step_bytes)
    assert bound["max_tokens_per_s"] == min(bound["memory_bound_tokens_per_s"], bound["compute_bound_tokens_per_s"])
    cfg = model.config  # K and V of every layer, fp32
    assert bound["kv_bytes_per_token"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert decode_bound(model, "Some GPU", slots=8, context=100)["card"] is None


def test_table_names_skipped_rows_and_ratios():
    report = {"workload": {"stop": [], "stopping": "budget"}, "bound": {"card": None, "note": "no constants"},
              "rows": [{"row": "engine", "prompts": 4, "new_tokens": 40, "seconds": 1.0, "tokens_per_s": 40.0,
                        "full_task_seconds": 1.0, "peak_gib": None, "extrapolated": False, "all_to_budget": True},
                       {"row": "transformers", "prompts": 2, "new_tokens": 20, "seconds": 2.0, "tokens_per_s": 10.0,
                        "full_task_seconds": 4.0, "peak_gib": 1.5, "extrapolated": True, "all_to_budget": True,
                        "batch_size": 2, "candidates": [{"batch_size": 2}]},
                       {"row": "generate_batch", "skipped": "transformers 4.0 has no generate_batch"}]}
    text = table(report)
    assert "| engine | 4 | 40 | 1.0 | 40 | 1.0 | — | 4.00x |" in text
    assert "batch 2 (tried 2); full task extrapolated by prompt count" in text
    assert "| generate_batch | | | | | | | | skipped: transformers 4.0 has no generate_batch |" in text


@pytest.mark.parametrize("flags, expected", [
    (["--rows", "engine,vllm"], ["--rows = 'engine,vllm'", "engine, transformers, generate_batch", "unknown: vllm"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens = '0'", "a positive integer"]),
    (["--batch-sizes", "64,x"], ["--batch-sizes = '64,x'", "comma-separated positive integers"]),
    (["--stopping", "eos"], ["--stopping = 'eos'", "auto, budget, source"]),
    (["--model", "llama-8b"], ["--model = 'llama-8b'", "unknown shape", "llama-3-8b", "packaged:smollm2-135m"]),
    (["--model", "tiny-roberta"], ["--model = 'tiny-roberta'", "not a decoder shape"]),
    (["--dtype", "fp8"], ["--dtype = 'fp8'", "float32, bfloat16, float16"]),
    (["--preset", "tiny"], ["--preset is a training-bench option"]),
])
def test_cli_rejects_bad_flags_naming_flag_value_and_allowed(flags, expected, capsys):
    assert main(["bench", "--eval", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, (text, err)


def test_cli_reports_every_problem_at_once_and_eval_flags_need_eval(capsys):
    assert main(["bench", "--eval", "--device", "cpu", "--rows", "gpu", "--num-prompts", "-1", "--slots", "x"]) == 2
    err = capsys.readouterr().err
    assert "--rows = 'gpu'" in err and "--num-prompts = '-1'" in err and "--slots = 'x'" in err
    assert main(["bench", "--device", "cpu", "--rows", "engine"]) == 2
    assert "--rows go(es) with --eval" in capsys.readouterr().err
