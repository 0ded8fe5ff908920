"""What a plain run says about its data and its calibration, found by a newcomer reproducing seed 001 on the CPU:
``max_train_samples`` 64 with ``max_length`` 96 on gsm8k trains on 38 rows, and the opening line says why the other
26 went (their target falls beyond max_length after truncation) and which setting keeps them; a run whose init
read no data records that no calibration ran (meta_info.dataset.calibration null and a note), although its
training parameters, kept whole as seed 004's format keeps them, carry the default calibration block; the report
reads such a record."""

import json

import pytest

from loralab.cli import main


@pytest.fixture(scope="module")
def plain_run(smollm2_cut_path, data_dir, tmp_path_factory):
    """One plain-LoRA gsm8k run (one step) on SmolLM2 cut to two layers: its record and its stderr."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("plain")
    folder = root / "experiments" / "newcomer" / "lora"
    folder.mkdir(parents=True)
    (folder / "training_parameters.json").write_text(json.dumps({
        "task": "gsm8k", "model_id": smollm2_cut_path, "data_dir": str(data_dir), "max_train_samples": 64,
        "max_length": 96, "batch_size": 4, "max_steps": 1, "eval_tasks": [], "device": "cpu"}))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setenv("LORALAB_RESULTS_DIR", str(root / "results"))
        mp.setenv("LORALAB_OUTPUT_DIR", str(root / "outputs"))
        assert main(["run", str(folder)]) == 0
    (path,) = (root / "results").rglob("*.json")
    return json.loads(path.read_text()), err.getvalue(), path


@pytest.mark.slow
def test_the_opening_line_says_how_many_training_rows_were_dropped_and_why(plain_run):
    result, err, _ = plain_run
    dataset = result["meta_info"]["dataset"]
    kept, dropped = dataset["train_examples"], dataset["dropped_without_target"]
    assert dropped > 0 and kept + dropped == 64
    (opening,) = [line for line in err.splitlines() if f"({kept} train / 0 eval examples)" in line]
    assert (f"; {dropped} of 64 training rows dropped: their target falls beyond max_length = 96 tokens after "
            "truncation") in opening and "raise 'max_length' to keep them" in opening


@pytest.mark.slow
def test_a_run_that_calibrated_nothing_says_so_and_the_report_reads_it(plain_run):
    from loralab.report.records import load_runs

    result, _, path = plain_run
    dataset = result["meta_info"]["dataset"]
    assert "calibration" in dataset and dataset["calibration"] is None
    assert dataset["calibration_note"].startswith("no calibration ran: method lora's init reads no data")
    assert result["run_info"]["config"]["training_parameters"]["calibration"]["num_samples"] == 256  # kept whole
    runs, problems = load_runs([path])
    assert problems == [] and len(runs) == 1 and runs[0].method == "lora"
