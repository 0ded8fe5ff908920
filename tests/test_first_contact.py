"""Issue 24 (first contact): an explicit empty ``eval_tasks`` means no evaluation, the opening
line's evaluation count, generation bars that count problems and show new tokens/s, one message
and exit code 2 for anything that cannot be fetched (hub calls made to fail fast, no network), and
adapters whose base is a ``packaged:`` id resolved by ``loralab eval`` / ``loralab merge``."""

import json
import time
from pathlib import Path

import pytest

from loralab.cli import main
from loralab.config import TrainingParameters, build_parameters
from loralab.experiment import hashed_parameters
from loralab.results import sha256_json
from loralab.tasks.base import TaskData, eval_count
from loralab.tasks.instruct import TASKS


def test_eval_tasks_unset_means_default_and_empty_means_none(data_dir):
    gsm8k = TASKS["gsm8k"]
    assert gsm8k.eval_names(TrainingParameters(task="gsm8k")) == ["gsm8k"]
    assert gsm8k.eval_names(TrainingParameters(task="gsm8k", eval_tasks=[])) == []
    assert gsm8k.evaluation_settings(TrainingParameters(task="gsm8k", eval_tasks=[])) == {}
    params = build_parameters({"task": "gsm8k", "eval_tasks": [], "data_dir": str(data_dir)})
    assert gsm8k.check(params) == []
    assert gsm8k.evaluate(None, None, TaskData(train=[], eval=[]), params, None) == {}


def test_unset_eval_tasks_hashes_as_before_and_explicit_empty_differs():
    unset = build_parameters({})
    assert unset.eval_tasks is None
    old_default = {**hashed_parameters(unset), "eval_tasks": []}  # what the default hashed as before issue 24
    assert sha256_json(hashed_parameters(unset)) == sha256_json(old_default)
    empty = build_parameters({"eval_tasks": []})
    assert sha256_json(hashed_parameters(empty)) != sha256_json(hashed_parameters(unset))
    assert sha256_json(hashed_parameters(build_parameters({"eval_tasks": ["gsm8k"]}))) != sha256_json(old_default)


def test_eval_count_is_the_number_of_problems_scored(data_dir):
    gsm8k = TASKS["gsm8k"]
    data = TaskData(train=[], eval=[])
    params = build_parameters({"task": "gsm8k", "data_dir": str(data_dir), "max_eval_samples": 20})
    assert eval_count(gsm8k, data, params) == 20
    assert eval_count(gsm8k, data, build_parameters({"task": "gsm8k", "data_dir": str(data_dir), "eval_tasks": []})) == 0
    assert eval_count(gsm8k, data, build_parameters({"task": "gsm8k", "data_dir": str(data_dir)})) == 1319

    class Classify:  # a task without eval_count: its tokenized evaluation features
        pass

    assert eval_count(Classify(), TaskData(train=[], eval=[{}, {}, {}]), params) == 3


def test_only_selected_rows_are_tokenized(data_dir, monkeypatch):
    from loralab.tasks import instruct

    seen = []
    real = instruct.tokenize_rows

    def spy(style, pair, rows, tokenizer, max_length):
        seen.append(len(rows))
        return real(style, pair, rows, tokenizer, max_length)

    monkeypatch.setattr(instruct, "tokenize_rows", spy)
    from loralab.models import load_tokenizer

    data = TASKS["gsm8k"].load(build_parameters({"task": "gsm8k", "data_dir": str(data_dir), "max_train_samples": 12,
                                                 "max_length": 256}), load_tokenizer("packaged:smollm2-135m"))
    assert seen == [12] and len(data.train) == 12


@pytest.mark.parametrize("backend", ["transformers", "engine"])
def test_generation_bar_counts_problems_and_shows_new_tokens_per_second(smollm2_path, backend, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.tasks.generation import GenerationSettings, generate

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path)
    prompts = ["1 + 1 =", "The capital of France is", "Once upon a time"]
    settings = GenerationSettings(max_new_tokens=3, batch_size=2, backend=backend)
    out = generate(model, tokenizer, prompts, settings, progress="probe")
    assert len(out) == 3
    err = capsys.readouterr().err
    assert "3/3" in err and "problem" in err and "new tok/s" in err, err[-500:]


@pytest.fixture
def no_hub(monkeypatch):
    """A hub that refuses connections at once (a closed local port), whatever this machine's network."""
    from loralab import models

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_REACHABLE", {})


def _experiment(tmp_path, params) -> Path:
    from peft import LoraConfig

    exp = tmp_path / "experiments" / "offline" / "case"
    exp.mkdir(parents=True)
    LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(exp)
    (exp / "training_parameters.json").write_text(json.dumps(params))
    return exp


def _assert_offline_help(err: str, what: str):
    assert f"cannot fetch {what}" in err, err
    for alternative in ("'data_dir'", "$LORALAB_DATA_DIR", "'model_id'", "HF_HUB_OFFLINE=1"):
        assert alternative in err, (alternative, err)


def test_unreachable_hub_model_exits_2_fast_naming_the_alternatives(tmp_path, data_dir, no_hub, capsys):
    import os

    exp = _experiment(tmp_path, {"model_id": "nobody-here/no-such-model", "task": "gsm8k", "data_dir": str(data_dir),
                                 "max_train_samples": 2, "max_steps": 1, "eval_tasks": [], "device": "cpu"})
    start = time.perf_counter()
    assert main(["run", str(exp)]) == 2
    assert time.perf_counter() - start < 20
    _assert_offline_help(capsys.readouterr().err, "")
    assert not list(Path(os.environ["LORALAB_RESULTS_DIR"]).rglob("*.json"))  # no record, as for any config error


def test_unreachable_hub_dataset_exits_2_fast_naming_the_alternatives(tmp_path, no_hub, monkeypatch, capsys):
    import os

    monkeypatch.delenv("LORALAB_DATA_DIR", raising=False)
    exp = _experiment(tmp_path, {"model_id": "random:tiny-llama", "task": "gsm8k", "max_train_samples": 2,
                                 "max_steps": 1, "eval_tasks": [], "device": "cpu"})
    start = time.perf_counter()
    assert main(["run", str(exp)]) == 2
    assert time.perf_counter() - start < 20
    _assert_offline_help(capsys.readouterr().err, "training data 'openai/gsm8k'")
    assert not list(Path(os.environ["LORALAB_RESULTS_DIR"]).rglob("*.json"))


def test_unreachable_evaluation_data_in_loralab_eval_exits_2(no_hub, monkeypatch, capsys):
    monkeypatch.delenv("LORALAB_DATA_DIR", raising=False)
    assert main(["eval", "--model", "packaged:smollm2-135m", "--tasks", "gsm8k", "--max-samples", "1"]) == 2
    _assert_offline_help(capsys.readouterr().err, "evaluation data 'openai/gsm8k main'")


def test_portable_model_id():
    from loralab.models import portable_model_id

    assert portable_model_id("packaged:smollm2-135m") == "packaged:smollm2-135m"
    assert portable_model_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert portable_model_id("random:tiny-llama") == "random:tiny-llama"
    assert Path(portable_model_id(".")).is_absolute()


@pytest.fixture
def packaged_adapter(tmp_path, smollm2_path):
    """A LoRA adapter of SmolLM2 whose config names its base as ``packaged:smollm2-135m``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_path),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "packaged:smollm2-135m"}))
    return folder


def test_eval_resolves_a_packaged_base_from_the_adapter(packaged_adapter, data_dir, tmp_path):
    out = tmp_path / "metrics.json"
    assert main(["eval", "--adapter", str(packaged_adapter), "--tasks", "gsm8k", "--max-samples", "1",
                 "--max-new-tokens", "2", "--data-dir", str(data_dir), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["gsm8k"]["n"] == 1


@pytest.mark.slow
def test_merge_resolves_a_packaged_base_from_the_adapter(packaged_adapter, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(packaged_adapter), "--out", str(out)]) == 0
    assert (out / "config.json").is_file()


def test_unreachable_hub_model_in_loralab_eval_exits_2_fast(no_hub, data_dir, capsys):
    start = time.perf_counter()
    assert main(["eval", "--model", "nobody-here/no-such-model", "--tasks", "gsm8k", "--data-dir", str(data_dir)]) == 2
    assert time.perf_counter() - start < 20
    _assert_offline_help(capsys.readouterr().err, "the tokenizer of model_id 'nobody-here/no-such-model'")


def test_a_run_with_eval_tasks_empty_succeeds_without_evaluation(tmp_path, data_dir, capsys):
    import os

    exp = _experiment(tmp_path, {"model_id": "random:tiny-llama", "task": "gsm8k", "data_dir": str(data_dir),
                                 "max_train_samples": 2, "max_steps": 1, "batch_size": 2, "max_length": 64,
                                 "eval_tasks": [], "device": "cpu"})
    assert main(["run", str(exp)]) == 0
    out = capsys.readouterr()
    assert "no evaluation: eval_tasks is []" in out.err and "evaluating" not in out.err
    assert ": lora no evaluation -> " in out.out  # the closing line says so, not an empty metrics slot
    (path,) = Path(os.environ["LORALAB_RESULTS_DIR"]).rglob("*.json")
    record = json.loads(path.read_text())
    assert record["train_info"]["status"] == "success" and record["eval"] == {}
    assert not list(Path(os.environ["LORALAB_OUTPUT_DIR"]).rglob("*generations.jsonl"))


def test_opening_line_counts_what_is_scored_and_says_where_the_result_goes_and_why(tmp_path, data_dir, monkeypatch,
                                                                                    capsys):
    """An experiment folder outside loralab's tree: the opening line counts the problems the final
    evaluation scores (3, not 0), shows the adapter and result folders the same way (relative to the
    working folder here), and says why the record goes where it goes; the record carries the code's
    git state, measured from loralab's own tree; the adapter records the model id the user gave."""
    import os

    from loralab import results

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORALAB_RESULTS_DIR", "loralab-results")
    monkeypatch.setenv("LORALAB_OUTPUT_DIR", "loralab-outputs")
    exp = _experiment(tmp_path, {"model_id": "random:tiny-llama", "task": "gsm8k", "data_dir": str(data_dir),
                                 "max_train_samples": 2, "max_steps": 1, "batch_size": 2, "max_length": 64,
                                 "eval_tasks": ["gsm8k"], "max_eval_samples": 3, "generation": {"max_new_tokens": 2},
                                 "device": "cpu"})
    assert main(["run", str(exp)]) == 0
    err = capsys.readouterr().err
    opening = next(line for line in err.splitlines() if "eval examples)" in line)
    assert " train / 3 eval examples)" in opening
    assert "evaluating gsm8k (3 examples)" in err
    adapter = opening.split("adapter -> ")[1].split(",")[0]
    assert adapter.startswith("loralab-outputs" + os.sep) and adapter.endswith("adapter")
    (path,) = Path("loralab-results").rglob("*.json")
    record = json.loads(path.read_text())
    git = record["run_info"]["git"]
    assert git == {**git, **{k: v for k, v in results.git_state().items() if k in ("commit", "branch")}}
    reason = results.route_reason(git)
    assert f"result -> {path.parent}/ on success ({reason})" in opening
    if git["commit"] != results.UNKNOWN:  # a checkout: an outside folder is never a main run
        assert git["experiment_committed"] is False and path.parent.name == "temporary_results"
        assert reason in ("the experiment folder is not committed in loralab's tree",
                          "the code has uncommitted changes") or reason.startswith(
            ("the code is on branch", "the code has files git does not track", "the code has uncommitted changes, and"))
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "random:tiny-llama"
