"""Instruction fine-tuning tasks: templates verbatim, loss masking on the real SmolLM2 tokenizer and
real GSM8K / Alpaca / LLM-Adapters rows, source splits, and the shipped experiment folders."""

import json
from pathlib import Path

import pytest

from loralab.config import ConfigError, build_parameters
from loralab.tasks import TASKS, get_task, instruct
from loralab.tasks.instruct_templates import ALPACA_INPUT, ALPACA_NO_INPUT, DORA_INPUT, DORA_NO_INPUT, PEFT_MC_QUERY

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from loralab.models import load_tokenizer

    return load_tokenizer("packaged:smollm2-135m")


def params(**overrides):
    return build_parameters({"model_id": "packaged:smollm2-135m", "max_length": 512, **overrides})


def gsm8k_rows(data_dir, n):
    with open(data_dir / "gsm8k" / "train.jsonl") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


# ------------------------------------------------------------------------------------ templates


def test_templates_are_the_sources_strings():
    # Written out by hand from Stanford Alpaca train.py PROMPT_DICT and DoRA finetune.py generate_prompt.
    assert ALPACA_NO_INPUT == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\n{instruction}\n\n### Response:"
    )
    assert ALPACA_INPUT.endswith("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
    assert "paired with an input that provides further context. Write" in ALPACA_INPUT
    sixteen = " " * 16
    assert DORA_NO_INPUT == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
        + sixteen + "### Instruction:\n" + sixteen + "{instruction}\n" + sixteen + "\n"
        + sixteen + "### Response:\n" + sixteen + "{output}"
    )
    assert "completes the request. \n\n" + sixteen + "### Instruction:" in DORA_INPUT  # one space in this variant
    assert (sixteen + "### Input:\n" + sixteen + "{input}\n" + sixteen + "\n") in DORA_INPUT
    assert PEFT_MC_QUERY == "Question: {query} Think step by step.\nAnswer:"


def test_registered_tasks_follow_the_protocol():
    for name in ("metamath", "codefeedback", "commonsense170k", "alpaca", "wizardlm", "gsm8k", "codealpaca", "metamath_peft"):
        task = get_task(name)
        assert TASKS[name] is task and task.name == name and task.kind == "causal_lm"
        assert callable(task.check) and callable(task.load) and callable(task.evaluate)
    assert get_task("metamath").default_evals == ("gsm8k",)
    assert get_task("codefeedback").default_evals == ("humaneval", "mbpp")
    assert len(get_task("commonsense170k").default_evals) == 8


# ------------------------------------------------------------------------------------ masking


def test_masked_labels_are_exactly_the_response_and_eos(tokenizer, data_dir):
    n = 40
    data = get_task("gsm8k").load(params(task="gsm8k", data_dir=str(data_dir), max_train_samples=n), tokenizer)
    rows = gsm8k_rows(data_dir, n)
    assert len(data.train) == n and data.provenance["dropped_without_target"] == 0
    assert data.provenance["sha256"] == "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"
    for row, feat in zip(rows, data.train):
        source = ALPACA_NO_INPUT.format(instruction=row["question"])
        response = instruct.gsm8k_to_metamath(row["answer"])
        source_ids = tokenizer(source)["input_ids"]
        ids, labels = feat["input_ids"], feat["labels"]
        assert len(ids) == len(labels) == len(feat["attention_mask"])
        assert ids[: len(source_ids)] == source_ids  # the prompt is a token prefix of prompt+response
        assert labels[: len(source_ids)] == [-100] * len(source_ids)
        kept = labels[len(source_ids):]
        assert -100 not in kept and kept == ids[len(source_ids):]
        assert kept[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(kept) == response + tokenizer.eos_token
        assert tokenizer.decode(ids) == source + response + tokenizer.eos_token


def test_truncation_and_prompt_only_rows(tokenizer, data_dir):
    p = params(task="gsm8k", data_dir=str(data_dir), max_train_samples=30, max_length=64)
    data = get_task("gsm8k").load(p, tokenizer)
    assert all(len(f["input_ids"]) <= 64 for f in data.train)
    assert all(any(x != -100 for x in f["labels"]) for f in data.train)
    rows = gsm8k_rows(data_dir, 30)
    too_long = sum(len(tokenizer(ALPACA_NO_INPUT.format(instruction=r["question"]))["input_ids"]) >= 64 for r in rows)
    assert too_long > 0 and data.provenance["dropped_without_target"] == too_long
    assert len(data.train) == 30 - too_long


def test_gsm8k_answers_become_metamath_style(data_dir):
    with open(data_dir / "gsm8k" / "train.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    for row in rows:
        out = instruct.gsm8k_to_metamath(row["answer"])
        gold = row["answer"].split("#### ")[-1].strip()
        assert out.endswith(f"\nThe answer is: {gold}") and "<<" not in out and "####" not in out
    with pytest.raises(ValueError, match="####"):
        instruct.gsm8k_to_metamath("no final line")


def test_alpaca_picks_the_input_variant_per_row(tokenizer, data_dir):
    n = 60
    data = get_task("alpaca").load(params(task="alpaca", data_dir=str(data_dir), max_train_samples=n), tokenizer)
    rows = json.loads((data_dir / "alpaca" / "alpaca_5000.json").read_text())[:n]
    assert data.provenance["path"].endswith("alpaca_5000.json") and len(data.train) == n
    with_input = merged = 0
    for row, feat in zip(rows, data.train):
        text = tokenizer.decode(feat["input_ids"])
        assert ("### Input:\n" in text) == bool(row["input"])
        with_input += bool(row["input"])
        source_ids = tokenizer(instruct.alpaca_prompt(row["instruction"], row["input"]))["input_ids"]
        assert feat["labels"] == [-100] * len(source_ids) + feat["input_ids"][len(source_ids):]
        kept = tokenizer.decode(feat["input_ids"][len(source_ids):])
        target = row["output"] + tokenizer.eos_token
        # The sources mask len(tokenized prompt) positions; where BPE merges the prompt's last ':'
        # with the response's first characters (':-'), those characters are masked with it.
        assert target.endswith(kept) and len(target) - len(kept) <= 2
        merged += kept != target
    assert 0 < with_input < n
    assert merged >= 1  # rows 10, 31, 41 and 48 of alpaca_5000.json start with "- "


# ------------------------------------------------------------------------------------ DoRA / peft


def test_dora_split_matches_datasets_train_test_split(data_dir):
    datasets = pytest.importorskip("datasets")
    rows = json.loads((data_dir / "llm-adapters" / "dataset" / "piqa" / "test.json").read_text())[:500]
    split = datasets.Dataset.from_list(rows).train_test_split(test_size=120, shuffle=True, seed=42)
    train_idx, val_idx = instruct.dora_split(len(rows))
    assert split["train"]["instruction"] == [rows[i]["instruction"] for i in train_idx]
    assert split["test"]["instruction"] == [rows[i]["instruction"] for i in val_idx]


def test_commonsense_trains_on_the_whole_indented_prompt(tokenizer, data_dir, tmp_path):
    # LLM-Adapters' test files share commonsense_170k's schema; 300 real BoolQ rows stand in for it.
    rows = json.loads((data_dir / "llm-adapters" / "dataset" / "boolq" / "test.json").read_text())[:300]
    target = tmp_path / "llm-adapters" / "ft-training_set" / "commonsense_170k.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(rows))
    p = params(task="commonsense170k", data_dir=str(tmp_path), max_length=256, max_train_samples=50)
    data = get_task("commonsense170k").load(p, tokenizer)
    assert data.provenance["validation_held_out"] == 120 and len(data.train) == 50
    train_idx, _ = instruct.dora_split(300)
    for i, feat in zip(train_idx, data.train):
        row = rows[i]
        assert feat["labels"] == feat["input_ids"]  # train_on_inputs=True
        text = instruct.dora_prompt(row["instruction"], row["input"], row["output"])
        ids = tokenizer(text, truncation=True, max_length=256)["input_ids"]
        expected = ids + [tokenizer.eos_token_id] if len(ids) < 256 else ids
        assert feat["input_ids"] == expected
        assert "                ### Response:\n                the correct answer is" in tokenizer.decode(feat["input_ids"])


def test_peft_protocol_filters_by_characters_and_keeps_the_prompt_in_the_loss(tokenizer, data_dir, tmp_path):
    # GSM8K train rows as MetaMathQA-shaped query/response records (real text; MetaMathQA is hub-only).
    rows = [{"query": r["question"], "response": instruct.gsm8k_to_metamath(r["answer"])} for r in gsm8k_rows(data_dir, 80)]
    long_rows = sum(len(f"{r['query']} {r['response']}") > 1300 for r in rows)
    rows.append({"query": "x" * 1200, "response": "y" * 101})  # 1,302 characters: dropped
    (tmp_path / "metamath").mkdir()
    (tmp_path / "metamath" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    p = params(task="metamath_peft", data_dir=str(tmp_path), max_length=768)
    data = get_task("metamath_peft").load(p, tokenizer)
    assert data.provenance["dropped_over_max_chars"] == long_rows + 1
    first = rows[0]
    feat = data.train[0]
    assert feat["labels"] == feat["input_ids"]
    assert tokenizer.decode(feat["input_ids"]) == PEFT_MC_QUERY.format(query=first["query"]) + first["response"] + tokenizer.eos_token


# ------------------------------------------------------------------------------------ checks


def test_check_names_missing_files_and_unknown_evals(tmp_path, data_dir):
    problems = get_task("metamath").check(params(task="metamath", data_dir=str(data_dir)))
    assert len(problems) == 1 and "metamath/MetaMathQA-395K.json" in problems[0] and "meta-math/MetaMathQA" in problems[0]
    assert get_task("gsm8k").check(params(task="gsm8k", data_dir=str(data_dir))) == []
    problems = get_task("gsm8k").check(params(task="gsm8k", data_dir=str(data_dir), eval_tasks=["gsm8kk"]))
    assert len(problems) == 1 and "did you mean 'gsm8k'" in problems[0]
    with pytest.raises(FileNotFoundError, match="MetaMathQA"):
        get_task("metamath").rows(params(task="metamath", data_dir=str(tmp_path)))


# ------------------------------------------------------------------------------------ shipped experiments


def test_shipped_llm_experiments_validate_and_are_up_to_date(tmp_path, monkeypatch, load_script):
    from loralab.experiment import read_experiment

    # the shipped LLM experiments read the hub (MetaMathQA etc. are hub-only); a LORALAB_DATA_DIR
    # pointing at ../shared/data would send them to a folder without those files
    monkeypatch.delenv("LORALAB_DATA_DIR", raising=False)

    folders = sorted(p.parent for p in (REPO / "experiments" / "llm").rglob("adapter_config.json"))
    assert len(folders) == 19
    for folder in folders:
        try:
            exp = read_experiment(folder)
        except ConfigError as exc:  # pragma: no cover - the message is the point
            pytest.fail(str(exc))
        assert exp.params.task in TASKS and exp.peft_config is not None
        assert (folder / "README.md").read_text().startswith("# ")
    seed000 = read_experiment(REPO / "experiments/llm/seed000-llama3-8b-math/lora")
    assert seed000.params.batch_size * seed000.params.gradient_accumulation_steps == 128
    assert "1,024" in (REPO / "experiments/llm/seed000-llama3-8b-math/lora/README.md").read_text()
    assert "lm_head" in seed000.peft_config.target_modules
    qkv = read_experiment(REPO / "experiments/llm/seed002-llama-7b-commonsense/dora-qkv-r32")
    assert qkv.params.magnitude_only_modules == ["o_proj", "gate_proj", "up_proj", "down_proj"]
    kpa = read_experiment(REPO / "experiments/llm/seed001-llama2-7b-metamath/corda-kpa-nqopen-r128")
    assert kpa.peft_config.corda_config.corda_method == "kpm" and kpa.params.calibration["dataset"] == "nqopen"
    # Only non-default keys are stored.
    stored = json.loads((REPO / "experiments/llm/metamathqa-llama-3.2-3b/lora-rank32/training_parameters.json").read_text())
    assert "logging_steps" not in stored and stored["max_steps"] == 5000
    script = load_script("make_llm_experiments")
    assert script.main(["--check"]) == 0, "experiments/llm is out of date: run scripts/make_llm_experiments.py"
    assert script.main(["--check", "--out", str(tmp_path)]) == 1  # the check can fail
    shipped = (REPO / "experiments/llm/seed000-llama3-8b-math/lora/adapter_config.json").read_text()
    data = json.loads(shipped)
    assert script.adapter_configs_agree(shipped, json.dumps({**data, "peft_version": "9.9.9"}))  # who wrote it
    assert script.adapter_configs_agree(shipped, json.dumps({k: v for k, v in data.items() if k != "use_dora"}))  # a default
    assert not script.adapter_configs_agree(shipped, json.dumps({**data, "r": data["r"] + 1}))
    assert not script.adapter_configs_agree(shipped, json.dumps({**data, "target_modules": data["target_modules"][1:]}))
