"""Bad input stops a run before any training: exit code 2, every problem named at once, no result."""

import contextlib
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from peft import LoraConfig

from loralab.cli import main
from loralab.config import ConfigError, build_parameters, default_parameters, merge_parameters
from loralab.experiment import checked_parameters


def write_exp(root: Path, params: dict, adapter: dict | None = None, name="exp") -> Path:
    folder = root / "experiments" / "case" / name
    folder.mkdir(parents=True)
    (folder / "training_parameters.json").write_text(json.dumps(params))
    if adapter is not None:
        LoraConfig(**adapter).save_pretrained(folder)
    return folder


def run_cli(*args, env_extra=None):
    """``loralab run ARGS`` in this process (a subprocess per case cost ~10 s of imports each)."""
    old = dict(os.environ)
    os.environ.update(env_extra or {})
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["run", *map(str, args)])
    finally:
        os.environ.clear()
        os.environ.update(old)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def no_results(env_root: Path) -> bool:
    return not any(env_root.rglob("*.json")) if env_root.exists() else True


def test_nested_dicts_merge_key_by_key():
    merged, problems = merge_parameters({"calibration": {"num_samples": 32}})
    assert not problems
    assert merged["calibration"]["num_samples"] == 32
    assert merged["calibration"]["seed"] == default_parameters()["calibration"]["seed"]
    assert merged["calibration"]["sampling"] == "random"


def test_every_problem_reported_at_once():
    """Config's own checks and the registry checks (``experiment.checked_parameters``, what reading
    an experiment runs) in one list."""
    with pytest.raises(ConfigError) as err:
        checked_parameters({"learning_rat": 1e-4, "batch_size": "32", "warmup_ratio": 1.5, "optimizer": "adamv", "calibration": {"n": 3}})
    text = str(err.value)
    assert "'learning_rat'" in text and "did you mean 'learning_rate'" in text
    assert "'calibration.n'" in text and "num_samples" in text
    # unknown keys, wrong types and bad values together: nothing waits for another problem's fix
    assert "'batch_size' = '32' has the wrong type" in text and "'warmup_ratio' = 1.5" in text
    assert "'optimizer' = 'adamv'" in text and len(err.value.problems) == 5
    with pytest.raises(ConfigError) as err:
        checked_parameters({"batch_size": "32", "warmup_ratio": 1.5, "optimizer": "adamv", "lr_scheduler": "cosin"})
    problems = err.value.problems
    assert any("'batch_size'" in p and "wrong type" in p for p in problems) and len(problems) == 4
    # a key of the wrong type is checked no further: no line of a check across keys that reads its default
    with pytest.raises(ConfigError) as err:
        checked_parameters({"max_steps": "10", "num_epochs": 0})
    assert err.value.problems == ["'max_steps' = '10' has the wrong type; expected int | None"]
    # ... but a nested key of the same last name is another key: still checked
    with pytest.raises(ConfigError) as err:
        checked_parameters({"batch_size": "32", "calibration": {"batch_size": 0}})
    assert len(err.value.problems) == 2 and "'calibration.batch_size' = 0" in str(err.value)
    checked_parameters({"warmup_ratio": 0.1})  # a valid one passes
    with pytest.raises(ConfigError) as err:
        checked_parameters({"warmup_ratio": 1.5, "optimizer": "adamv", "lr_scheduler": "cosin", "max_steps": 0})
    text = str(err.value)
    assert "'warmup_ratio' = 1.5" in text
    assert "'optimizer' = 'adamv'" in text and "did you mean 'adamw'" in text and "lorafa" in text
    assert "'lr_scheduler' = 'cosin'" in text
    assert "'max_steps' = 0" in text
    assert len(err.value.problems) == 4


BASE = {"task": "glue/rte", "max_train_samples": 8, "max_eval_samples": 8, "max_steps": 1}


@pytest.mark.parametrize(
    "params,adapter,expected",
    [
        ({**BASE, "num_epoch": 3}, None, ["unknown key 'num_epoch'", "did you mean 'num_epochs'"]),
        ({**BASE, "learning_rate": "fast"}, None, ["'learning_rate' = 'fast' has the wrong type"]),
        ({**BASE, "batch_size": -4}, None, ["'batch_size' = -4 must be > 0"]),
        ({**BASE, "batch_size": -4, "optimizer": "adamv", "init": "milorra", "calibration": {"corda_options": {"scaling": "max"}}},
         None, ["'batch_size' = -4 must be > 0", "'optimizer' = 'adamv' is not allowed (did you mean 'adamw'?); allowed: adamw,",
                "'init' = 'milorra' is not allowed (did you mean 'milora'?); allowed: None,", "'calibration.corda_options': "]),
        ({**BASE, "task": "glue/rtee"}, None, ["'task' = 'glue/rtee' is unknown", "did you mean 'glue/rte'"]),
        ({**BASE, "task": "glue/sst3", "optimizer": "adamx", "dtype": "fp16", "model_id": "./no/such/model"}, None,
         ["'task' = 'glue/sst3' is unknown", "'optimizer' = 'adamx' is not allowed", "'dtype' = 'fp16' is not allowed",
          "'model_id' = './no/such/model': no such local folder"]),
        ({**BASE, "model_id": "./no/such/model"}, None, ["'model_id' = './no/such/model': no such local folder"]),
        ({**BASE, "data_dir": "/nonexistent/data"}, None, ["'data_dir' = '/nonexistent/data': no such folder"]),
    ],
    ids=["unknown-key", "wrong-type", "impossible-value", "unregistered-values", "unknown-task",
         "unknown-task-beside-bad-values", "missing-model-folder",
         "missing-data-dir"],
)
def test_bad_experiment_exits_2_without_result(tmp_path, params, adapter, expected, data_dir):
    folder = write_exp(tmp_path, {"data_dir": str(data_dir), **params} if "data_dir" not in params else params, adapter)
    results = tmp_path / "res"
    proc = run_cli(folder, env_extra={"LORALAB_RESULTS_DIR": str(results)})
    assert proc.returncode == 2, proc.stderr
    for fragment in expected:
        assert fragment in proc.stderr
    assert no_results(results)


def test_task_and_method_checks_are_not_hidden_by_a_bad_value(tmp_path, data_dir):
    """A bad value no longer stops the data folder's and the method's checks: a user fixes every problem in one
    pass. A line of those checks that would read a bad key's default is left out."""
    from loralab.experiment import read_experiment

    count = iter(range(100))

    def problems(params, adapter=None):
        with pytest.raises(ConfigError) as err:
            read_experiment(write_exp(tmp_path, params, adapter, name=f"exp{next(count)}"))
        return err.value.problems

    got = problems({**BASE, "batch_size": -4, "data_dir": "/nonexistent/data"})
    assert got[0] == "'batch_size' = -4 must be > 0" and "'data_dir' = '/nonexistent/data': no such folder" in got[1]
    assert len(got) == 2
    got = problems({**BASE, "data_dir": str(data_dir), "warmup_ratio": 2, "magnitude_only_modules": ["query"]})
    assert got == ["'warmup_ratio' = 2 must be in [0, 1)",
                   "'magnitude_only_modules' needs a DoRA adapter (adapter_config.json 'use_dora': true)"]
    # an unknown key that is no identifier ('learning-rate') still leaves the task and the model checked
    got = problems({**BASE, "learning-rate": 1e-4, "task": "glue/rtee"})
    assert any("unknown key 'learning-rate'" in p for p in got) and any("'task' = 'glue/rtee' is unknown" in p for p in got)
    # the task named wrongly typed: its data check waits (it would check the default task's files)
    got = problems({**BASE, "task": 3, "data_dir": "/nonexistent/data"})
    assert len(got) == 1 and got[0].startswith("'task' = 3 has the wrong type")
    # a wrongly typed 'quantization' is back at null for the method's check; its line "'speed.fp8_transpose_cache'
    # ... needs 'quantization': 'fp8' (here null)" would be about that default, not what the user wrote: left out
    adapter = {"peft_type": "LORA", "r": 4, "target_modules": ["query"], "task_type": "SEQ_CLS"}
    got = problems({**BASE, "data_dir": str(data_dir), "quantization": 8, "speed": {"fp8_transpose_cache": 0.5}}, adapter)
    assert len(got) == 1 and got[0].startswith("'quantization' = 8 has the wrong type")
    got = problems({**BASE, "data_dir": str(data_dir), "seed": "0", "speed": {"fp8_transpose_cache": 0.5}}, adapter)
    assert len(got) == 2 and got[1].startswith("'speed.fp8_transpose_cache' = 0.5 acts on an FP8 base only")


def test_calibration_generation_and_corda_values_are_checked_before_the_model_loads(tmp_path):
    """Values that used to fail only after the model loaded (an unknown calibration set, a zero seqlen's reshape
    error, a string temperature's TypeError, CorDA's 'kpa' for 'kpm') are problems of the configuration."""
    from loralab.experiment import read_experiment

    folder = write_exp(tmp_path, {**BASE, "calibration": {"dataset": "nq-open", "seqlen": 0},
                                  "generation": {"temperature": "hot", "top_p": 1.5, "n_samples": True}},
                       {"r": 4, "init_lora_weights": "corda", "corda_config": {"corda_method": "kpa"},
                        "target_modules": ["query"]})
    with pytest.raises(ConfigError) as err:
        read_experiment(folder)
    got = err.value.problems
    for line in ("adapter_config.json 'corda_config.corda_method' = 'kpa' must be 'ipm'",
                 "'calibration.seqlen' = 0 must be a positive integer",
                 "'calibration.dataset' = 'nq-open': calibration dataset 'nq-open' is unknown (did you mean 'nqopen'?)",
                 "'generation.temperature' = 'hot' must be >= 0", "'generation.top_p' = 1.5 must be in (0, 1]",
                 "'generation.n_samples' = True must be a positive whole number"):
        assert sum(p.startswith(line) for p in got) == 1, (line, got)
    assert len(got) == 6


def test_missing_data_file_named(tmp_path, data_dir):
    fake = tmp_path / "data" / "glue" / "RTE"
    fake.mkdir(parents=True)
    (fake / "train.tsv").write_text((data_dir / "glue/RTE/train.tsv").read_text())
    folder = write_exp(tmp_path, {**BASE, "data_dir": str(tmp_path / "data")})
    proc = run_cli(folder, env_extra={"LORALAB_RESULTS_DIR": str(tmp_path / "res")})
    assert proc.returncode == 2
    assert "dev.tsv" in proc.stderr and "glue/RTE" in proc.stderr


def test_all_problems_of_several_files_at_once(tmp_path, data_dir):
    folder = write_exp(tmp_path, {**BASE, "data_dir": str(data_dir), "seed": "zero", "optimzer": "adamw"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0, "lora_alpah": 8}))
    proc = run_cli(folder, env_extra={"LORALAB_RESULTS_DIR": str(tmp_path / "res")})
    assert proc.returncode == 2
    for fragment in ("'optimzer'", "did you mean 'optimizer'", "'lora_alpah'", "'r' = 0"):
        assert fragment in proc.stderr


def test_rank_larger_than_layer_allows(tmp_path, data_dir):
    folder = write_exp(tmp_path, {**BASE, "data_dir": str(data_dir)}, {"r": 512, "lora_alpha": 8, "target_modules": "all-linear"})
    proc = run_cli(folder, env_extra={"LORALAB_RESULTS_DIR": str(tmp_path / "res")})
    assert proc.returncode == 2, proc.stderr
    assert "'r' = 512 is larger than layer" in proc.stderr and "at most 384" in proc.stderr
    assert no_results(tmp_path / "res")


def test_method_that_does_not_fit_the_model(tmp_path, data_dir):
    """Seed 003's SVD LoRA-FA (as written) only has matching shapes on square layers."""
    folder = write_exp(
        tmp_path,
        {**BASE, "data_dir": str(data_dir), "init": "svd_lorafa"},
        {"r": 4, "lora_alpha": 1, "target_modules": ["query", "intermediate.dense"]},
    )
    proc = run_cli(folder, env_extra={"LORALAB_RESULTS_DIR": str(tmp_path / "res")})
    assert proc.returncode == 2, proc.stderr
    assert "'init' = 'svd_lorafa'" in proc.stderr and "square" in proc.stderr and "intermediate.dense" in proc.stderr
    assert no_results(tmp_path / "res")


def test_data_dir_from_environment(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("LORALAB_DATA_DIR", str(data_dir))
    assert build_parameters({}).data_dir == str(data_dir)
    assert build_parameters({"data_dir": "/x"}).data_dir == "/x"
@pytest.mark.slow  # over 2 s on 2 cores: the full suite runs it (the fast subset's 2-minute budget)
def test_shipped_glue_experiments_validate(monkeypatch):
    """Every shipped GLUE folder (seed 000 tables, seed 003 study, quickstart) reads cleanly."""
    from loralab.experiment import read_experiment

    monkeypatch.delenv("LORALAB_DATA_DIR", raising=False)
    root = Path(__file__).resolve().parents[1] / "experiments"
    causal_quickstart = root / "quickstart" / "lora-smollm2-gsm8k"  # the one causal-LM folder outside llm/
    folders = sorted(p.parent for p in root.rglob("training_parameters.json")
                     if "llm" not in p.parts and p.parent != causal_quickstart)
    assert len(folders) >= 60 + 27 + 1
    for folder in folders:
        exp = read_experiment(folder)
        assert exp.params.task.startswith("glue/")
    assert read_experiment(causal_quickstart).params.task == "gsm8k"
    corda = read_experiment(root / "glue-roberta" / "corda" / "rte")
    assert corda.params.model_id == "FacebookAI/roberta-base" and corda.peft_config.r == 128
    assert corda.peft_config.corda_config.corda_method == "ipm" and corda.params.calibration["num_samples"] == 256


def test_folder_without_config_files_is_not_an_experiment(tmp_path):
    """`loralab run experiments/glue-minilm/lora` (the parent of the task folders) must not start
    full fine-tuning on every default."""
    parent = tmp_path / "experiments" / "glue-minilm" / "lora"
    (parent / "rte").mkdir(parents=True)
    result = run_cli(parent)
    assert result.returncode == 2
    assert "not an experiment folder" in result.stderr and "rte" in result.stderr


def test_warmup_steps_round_up_like_the_trainer():
    from transformers import TrainingArguments

    from loralab.run.build import warmup_steps

    for ratio, total in [(0.03, 5), (0.03, 1000), (0.06, 1170), (0.1, 7), (0.0, 50)]:
        reference = TrainingArguments(output_dir="unused", warmup_steps=ratio, report_to=[]).get_warmup_steps(total)
        assert warmup_steps(ratio, total) == reference, (ratio, total)
    assert warmup_steps(0.03, 5) == 1  # was int(0.15) = 0: no warm-up where the Trainer has one step
