"""``loralab run DIR... --gpus``: folders run concurrently as subprocesses, one per slot, and a
re-run skips the folders that already have a success result for the same configuration (real
MiniLM, real GLUE rows; on CPU each slot is an empty CUDA_VISIBLE_DEVICES)."""

import json
import os
from io import StringIO
from pathlib import Path

import pytest

from loralab.experiment import read_experiment
from loralab.sweep import command, parse_gpus, run_sweep, slots_for

REPO = Path(__file__).resolve().parents[1]


def test_parse_gpus_names_bad_values():
    assert parse_gpus("all", ["0", "1", "2"]) == ["0", "1", "2"]
    assert parse_gpus("2", ["4", "5", "6"]) == ["4", "5"]
    with pytest.raises(ValueError, match="allowed: 1 to 3"):
        parse_gpus("4", ["0", "1", "2"])
    with pytest.raises(ValueError, match="'all' or a positive integer"):
        parse_gpus("two", ["0"])
    with pytest.raises(ValueError, match="no GPU is visible"):
        parse_gpus("all", [])
    assert command("exp", 2, True)[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_slots_share_gpus_or_group_them():
    assert slots_for(["0", "1"], runs_per_gpu=3) == [["0"], ["1"]] * 3  # first runs spread over both GPUs
    assert slots_for(["0", "1", "2", "3", "4"], per_run=2) == [["0", "1"], ["2", "3"]]
    with pytest.raises(ValueError, match="--runs-per-gpu 0: allowed: a positive integer"):
        slots_for(["0"], runs_per_gpu=0)
    with pytest.raises(ValueError, match="allowed: one of them above 1"):
        slots_for(["0", "1"], per_run=2, runs_per_gpu=2)


def _folder(root: Path, name: str, data_dir, lr: float) -> Path:
    folder = root / "experiments" / "sweep" / name
    folder.mkdir(parents=True)
    params = {"task": "glue/rte", "data_dir": str(data_dir), "max_train_samples": 16, "max_eval_samples": 8,
              "batch_size": 8, "num_epochs": 1, "learning_rate": lr, "device": "cpu"}
    (folder / "training_parameters.json").write_text(json.dumps(params))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                           "target_modules": ["query", "value"]}))
    return folder


@pytest.mark.slow
def test_sweep_runs_folders_concurrently_and_skips_finished_ones(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    a, b = _folder(tmp_path, "a", data_dir, 1e-3), _folder(tmp_path, "b", data_dir, 2e-3)
    exps = [read_experiment(a), read_experiment(b)]
    out = StringIO()
    assert run_sweep(exps, [""], runs_per_gpu=2, out=out, poll_s=0.1) == 0, out.getvalue()  # two runs, one "GPU"
    log = out.getvalue()
    assert log.index("start sweep/b") < log.index("done sweep/a")  # both ran at once
    results = sorted(Path(os.environ["LORALAB_RESULTS_DIR"]).rglob("*.json"))
    assert len(results) == 2
    # each record says its timings were taken sharing the GPU
    assert [json.loads(p.read_text())["meta_info"]["system_info"]["runs_per_gpu"] for p in results] == [2, 2]
    # a re-run finds both done; a changed configuration runs again
    params = json.loads((b / "training_parameters.json").read_text())
    (b / "training_parameters.json").write_text(json.dumps({**params, "learning_rate": 3e-3}))
    out = StringIO()
    assert run_sweep([read_experiment(a), read_experiment(b)], [""], out=out, poll_s=0.1) == 0, out.getvalue()
    assert "skip sweep/a" in out.getvalue() and "start sweep/b" in out.getvalue()
    assert "skip sweep/b" not in out.getvalue()
    assert len(list(Path(os.environ["LORALAB_RESULTS_DIR"]).rglob("*.json"))) == 3


def test_run_gpus_without_a_visible_gpu_is_an_error(tmp_path, data_dir, monkeypatch, capsys):
    from loralab.cli import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    folder = _folder(tmp_path, "a", data_dir, 1e-3)
    assert main(["run", str(folder), "--gpus", "all"]) == 2
    assert "no GPU is visible" in capsys.readouterr().err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert main(["run", str(folder), "--gpus", "3"]) == 2
    assert "allowed: 1 to 2" in capsys.readouterr().err
    assert main(["run", str(folder), "--runs-per-gpu", "4"]) == 2  # a sweep option without --gpus
    assert "--runs-per-gpu 4 needs --gpus" in capsys.readouterr().err
