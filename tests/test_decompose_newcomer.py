"""What a newcomer reproducing seed 001 (CorDA) with ``loralab decompose`` met, each now fixed:

- a ``--target-modules`` typo beside a valid name (``q_prj v_proj``) exited 0, wrote a residual model whose adapter
  covered only v_proj while its adapter_config.json still listed q_prj; every name wrong gave peft's message
  without a suggestion. Now each name that matches no module is named with the closest one, exit 2, before any
  weights load (the check ``loralab run`` makes, on the model's meta-device skeleton);
- kpa/ipa calibrated on ``nq_open/NQ-open.dev.jsonl`` (the default, the very file the ``nq_open`` evaluation
  scores) in silence; now it warns, naming the file, and decompose.json records ``overlaps_evaluations``;
- the study's caption labelled a corpus calibration with the prompt format "llama2-chat", which shapes instruction
  rows only, and its log printed each row as a Python dict.

Real SmolLM2-135M (whole, and cut to two decoder layers: ``smollm2_cut_path``), real data, tiny calibrations.
"""

import json

import pytest
from decompose_cli import decompose_argv, no_weights  # noqa: F401 - no_weights is a fixture

from loralab.cli import main

pytest.importorskip("attr", reason="peft's corda module imports the attrs package")

TYPO = "'--target-modules' names 'q_prj', which matches no module of the model (did you mean 'q_proj'?)"




@pytest.mark.parametrize("targets", [["q_prj", "v_proj"], ["q_prj"]], ids=["beside-a-valid-name", "alone"])
def test_a_target_module_typo_is_named_with_the_closest_name_before_any_weights_load(
        smollm2_cut_path, data_dir, no_weights, capsys, tmp_path, targets):
    out = tmp_path / "residual"
    argv = decompose_argv(smollm2_cut_path, data_dir, "--r", "8", "--target-modules", *targets, "--save-path", str(out))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: loralab decompose has 1 problem(s):") and TYPO in err, err
    assert "no nn.Linear/Conv1D module matches" not in err  # peft's line, without a suggestion, is not the answer
    assert not out.exists()


def test_a_target_typo_and_a_rank_too_large_are_named_at_once(smollm2_cut_path, data_dir, no_weights, capsys):
    assert main(decompose_argv(smollm2_cut_path, data_dir, "--r", "200", "--target-modules", "q_prj", "k_proj")) == 2
    err = capsys.readouterr().err
    assert "has 2 problem(s)" in err and TYPO in err, err
    assert "'--r' = 200 is larger than layer model.layers.0.self_attn.k_proj (576->192) allows (at most 192)" in err


def test_the_newcomers_command_on_the_packaged_model_exits_2_and_writes_nothing(smollm2_path, data_dir, no_weights,
                                                                                capsys, tmp_path):
    out = tmp_path / "x"
    argv = ["decompose", "--model", "packaged:smollm2-135m", "--mode", "kpa", "--r", "8", "--calib-size", "4",
            "--calib-seqlen", "32", "--target-modules", "q_prj", "v_proj", "--save-path", str(out),
            "--data-dir", str(data_dir), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has 1 problem(s)" in err and TYPO in err, err
    assert not out.exists()


def test_a_config_that_builds_no_causal_lm_is_still_named(tmp_path, data_dir, no_weights, capsys):
    """The early checks build the model's skeleton as ``loralab run`` does (``skeleton.build_skeleton``); where
    there is none, the line says why, as before."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llamma"}))
    assert main(decompose_argv(folder, data_dir, "--r", "4")) == 2
    err = capsys.readouterr().err
    assert f"'--model' = '{folder}': no causal language model can be built from its config (" in err
    assert "model type `llamma`" in err, err


def calibration_of(info: dict) -> dict:
    return json.loads(json.dumps(info["calibration"]))  # as decompose.json holds it


@pytest.mark.slow  # two decompositions of the cut model, one saved (about 5 s)
def test_kpa_calibrated_on_the_nq_open_file_warns_and_records_the_overlap(smollm2_cut_path, data_dir, tmp_path,
                                                                          capsys):
    nq = str((data_dir / "nq_open" / "NQ-open.dev.jsonl").resolve())
    out = tmp_path / "residual"
    assert main(decompose_argv(smollm2_cut_path, data_dir, "--r", "4", "--target-modules", "v_proj",
                               "--save-path", str(out))) == 0  # nqopen: the default calibration set
    err = capsys.readouterr().err
    assert f"warning: decompose --mode kpa: the calibration text ({nq}) is what nq_open" in err, err
    saved = json.loads((out / "decompose.json").read_text())["calibration"]
    assert saved["source"] == nq and saved["overlaps_evaluations"] == ["nq_open", "nq_open_lm_eval"]
    assert "inflates those scores" in saved["overlap_note"]

    assert main(decompose_argv(smollm2_cut_path, data_dir, "--r", "4", "--first-eigen", "--target-modules",
                               "v_proj", "--calib-dataset", "alpaca")) == 0  # a train split: no overlap
    captured = capsys.readouterr()
    assert "warning" not in captured.err, captured.err
    printed = json.loads(captured.out[captured.out.index("{"):])
    assert printed["mode"] == "ipa" and printed["calibration"]["overlaps_evaluations"] == []
    assert "overlap_note" not in printed["calibration"]


def test_ipa_without_save_path_warns_too(smollm2_cut_path, data_dir, capsys):
    from loralab.decomposition.build import build_adapter

    info = build_adapter(smollm2_cut_path, 2, mode="ipa", target_modules=["v_proj"], calib_size=2, seqlen=16,
                         batch_size=2, data_dir=data_dir)
    assert calibration_of(info)["overlaps_evaluations"] == ["nq_open", "nq_open_lm_eval"]
    err = capsys.readouterr().err
    assert "warning: decompose --mode ipa: the calibration text (" in err and "NQ-open.dev.jsonl" in err, err


def test_the_caption_names_a_prompt_format_only_for_instruction_rows(smollm2_cut_path, data_dir):
    from loralab.decomposition.calibration import calibration_samples
    from loralab.decomposition.study_report import caption
    from loralab.models import load_tokenizer

    tok = load_tokenizer(smollm2_cut_path)
    meta = {"model_id": "m", "dtype": "float32", "seq_len": 32, "max_windows": 1, "corpora": ["wikitext2"]}
    for name, shown in [("wikitext2", "(plain text, random, seed 233)"), ("ptb", "(plain text, random, seed 233)"),
                        ("alpaca", "(llama2-chat prompts, random, seed 233)")]:
        _, provenance = calibration_samples(name, tok, 2, seqlen=16, data_dir=data_dir)
        text = caption({**meta, "calibration": provenance})
        assert shown in text, text
        assert ("llama2-chat" in text) == (name == "alpaca")
    old = {"name": "c4", "num_samples": 2, "seqlen": 16, "fmt": "llama2-chat", "sampling": "random", "seed": 233,
           "source": "hub:allenai/c4/en/train"}  # a study written before provenance said its kind
    assert "(plain text, random" in caption({**meta, "calibration": old})


def test_a_row_logs_as_one_readable_line():
    from loralab.decomposition.study_report import row_line
    from loralab.tasks.metrics import settle

    row = settle({"method": "plain", "r": 32, "wikitext2": 313708.0123, "ptb": float("inf")})
    assert row_line(row, ["wikitext2", "ptb"]) == "plain r=32: wikitext2 perplexity 313,708.012, ptb perplexity overflowed"
    assert row_line({"method": "base", "r": 0, "wikitext2": 36.41}, ["wikitext2"]) == "base model: wikitext2 perplexity 36.410"
