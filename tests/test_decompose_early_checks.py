"""``loralab decompose`` reports every problem the arguments, the model's config and the data folder show
before any weights load (a slow step on a real model), exit 2, naming the flag, the value and what is allowed.

Each case runs the real command on the real SmolLM2-135M folder (cut to two layers) and the real data, with
``models.load_model`` replaced by one that fails the test: before these checks moved, each of them was
raised after the model had loaded (or, for --save-path, --device and --model, not at all: a traceback after
the load or after the calibration, or a folder silently overwritten).
"""

import pytest
from decompose_cli import decompose, no_weights  # noqa: F401 - no_weights is a fixture

pytest.importorskip("attr", reason="peft's corda module imports the attrs package")




@pytest.mark.parametrize("extra, messages", [
    (["--r", "4", "8"], ["'--r' takes one rank in mode 'kpa', got [4, 8]"]),
    (["--r", "4", "--calib-size", "0"], ["'--calib-size' = 0 must be a positive integer"]),
    (["--r", "4", "--calib-dataset", "nqopne"], ["'--calib-dataset': calibration dataset 'nqopne' is unknown "
                                                  "(did you mean 'nqopen'?)"]),
    (["--r", "200"], ["'--r' = 200 is larger than layer model.layers.0.self_attn.k_proj (576->192) allows (at most 192)",
                      "and 3 more of the 14 targeted layers"]),
    (["--r", "4", "--target-modules", "q_porj"], ["'--target-modules' names 'q_porj', which matches no module of "
                                                 "the model (did you mean 'q_proj'?)"]),
], ids=["two-ranks", "calib-size", "calib-dataset", "rank-above-layer", "target-modules"])
def test_argument_and_rank_problems_stop_before_the_model_loads(smollm2_cut_path, data_dir, no_weights, capsys,
                                                                 extra, messages):
    assert decompose(smollm2_cut_path, data_dir, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: loralab decompose has 1 problem(s):") and all(m in err for m in messages), err


def test_a_flag_of_the_other_mode_is_refused(smollm2_cut_path, data_dir, no_weights, capsys, tmp_path):
    study = ["--mode", "full-decompose", "--r", "4", "--first-eigen", "--save-path", str(tmp_path / "r"),
             "--solver", "svd"]
    assert decompose(smollm2_cut_path, data_dir, *study) == 2
    err = capsys.readouterr().err
    assert "has 3 problem(s)" in err, err
    assert "'--first-eigen' = True applies to --mode kpa/ipa only, not --mode full-decompose" in err
    assert f"'--save-path' = '{tmp_path / 'r'}' applies to --mode kpa/ipa only" in err  # nothing would be saved
    assert "'--solver' = 'svd' applies to --mode kpa/ipa only" in err
    assert decompose(smollm2_cut_path, data_dir, "--r", "4", "--seq-len", "64", "--out", str(tmp_path / "s")) == 2
    err = capsys.readouterr().err
    assert "'--seq-len' = 64 applies to --mode full-decompose only, not --mode kpa" in err, err
    assert "'--out' = " in err


def test_a_save_path_that_is_a_file_or_a_folder_in_use_is_refused(smollm2_cut_path, data_dir, no_weights, capsys,
                                                                    tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    assert decompose(smollm2_cut_path, data_dir, "--r", "4", "--save-path", str(file)) == 2
    assert f"'--save-path' = '{file}' is a file; it must be a folder (new or empty)" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.json").write_text("{}")  # an earlier residual model: adapters trained on it name this folder
    assert decompose(smollm2_cut_path, data_dir, "--r", "4", "--save-path", str(used)) == 2
    err = capsys.readouterr().err
    assert f"'--save-path' = '{used}' is a folder that is not empty" in err and "--force" in err
    assert (used / "config.json").read_text() == "{}"


def test_a_device_and_a_model_that_cannot_work_are_named_at_once(smollm2_cut_path, data_dir, no_weights, capsys,
                                                                  tmp_path):
    assert decompose(smollm2_cut_path, data_dir, "--r", "4", "--device", "gpu") == 2
    assert "'--device' = 'gpu' is not a torch device; allowed: cpu, cuda, cuda:N" in capsys.readouterr().err
    missing = tmp_path / "no-model"
    assert decompose(missing, data_dir, "--r", "4", "--calib-size", "0") == 2
    err = capsys.readouterr().err
    assert "has 2 problem(s)" in err and f"'--model' = '{missing}': no such local folder or file" in err, err


def test_the_studys_missing_corpora_stop_before_the_model_loads(smollm2_cut_path, data_dir, no_weights, capsys,
                                                                 tmp_path, monkeypatch):
    import loralab.models

    monkeypatch.setattr(loralab.models, "hub_offline_reason", lambda: "the Hugging Face Hub (test) is unreachable")
    local = tmp_path / "data"  # the calibration set is there, the scored corpora are not
    (local / "alpaca").mkdir(parents=True)
    (local / "alpaca" / "alpaca_5000.json").write_bytes((data_dir / "alpaca" / "alpaca_5000.json").read_bytes())
    assert decompose(smollm2_cut_path, local, "--mode", "full-decompose", "--r", "4", "--out", str(tmp_path / "s")) == 2
    err = capsys.readouterr().err
    assert "has 2 problem(s)" in err, err
    assert f"perplexity corpus wikitext2: {local / 'wikitext-2' / 'wiki.test.raw'} is not there" in err
    assert f"perplexity corpus ptb: {local / 'ptb' / 'ptb.valid.txt'} is not there" in err
    assert not (tmp_path / "s").exists()
