"""``loralab decompose``'s last checks that came late or never, each now made before any weights load (exit 2 from
the command, ``ConfigError`` from Python):

- a study ``--seq-len`` longer than a scored corpus was found only after the model loaded (it needs the corpus
  tokenized): now the tokenizer alone counts the corpus's tokens, and the message names the corpus, the count
  and the flag;
- a ``--calib-seqlen`` above the model's ``max_position_embeddings`` was not checked at all: now an error naming
  both numbers;
- a study ``--r`` that discards every component of every linear layer scored an all-zero model: now refused
  with the layers' sizes (an ``--r`` that empties only some layers warns);
- ``build.build_adapter`` called from Python checked the target names (and the rank) only after the model loaded.

Real SmolLM2-135M cut to two decoder layers (``smollm2_cut_path``: 15 linear layers, k_proj and v_proj 576->192,
max_position_embeddings 8192), real data; ``models.load_model`` fails the test where it is called.
"""

import pytest
from decompose_cli import decompose, no_weights  # noqa: F401 - no_weights is a fixture

from loralab.config import ConfigError

pytest.importorskip("attr", reason="peft's corda module imports the attrs package")




@pytest.fixture
def short_corpora(data_dir, tmp_path):
    """A data folder with the alpaca calibration file and the first lines of the real WikiText-2 test and PTB
    validation files (so that tokenizing them takes milliseconds)."""
    local = tmp_path / "data"
    for rel, lines in (("alpaca/alpaca_5000.json", None), ("wikitext-2/wiki.test.raw", 40),
                       ("ptb/ptb.valid.txt", 20)):
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        text = (data_dir / rel).read_text(encoding="utf-8")
        (local / rel).write_text(text if lines is None else "\n".join(text.splitlines()[:lines]) + "\n",
                                 encoding="utf-8")
    return local


def token_counts(model, data_dir) -> dict[str, int]:
    from transformers import AutoTokenizer

    from loralab.tasks.corpora import load_corpus

    tokenizer = AutoTokenizer.from_pretrained(model)
    return {c: len(tokenizer(load_corpus(c, data_dir)).input_ids) for c in ("wikitext2", "ptb")}


def test_a_seq_len_longer_than_a_study_corpus_is_named_with_its_token_count(smollm2_cut_path, short_corpora,
                                                                            no_weights, capsys, tmp_path):
    counts = token_counts(smollm2_cut_path, short_corpora)
    assert counts["ptb"] < counts["wikitext2"] < 5000, counts
    seq_len = counts["ptb"] + 1  # PTB is too short, WikiText-2 is not
    argv = ["--mode", "full-decompose", "--r", "4", "--seq-len", str(seq_len), "--out", str(tmp_path / "s")]
    assert decompose(smollm2_cut_path, short_corpora, *argv) == 2
    err = capsys.readouterr().err
    assert "has 1 problem(s)" in err, err
    assert (f"'--seq-len' = {seq_len} is longer than corpus ptb (PTB validation: {counts['ptb']} tokens with this "
            f"model's tokenizer): no window to score; allowed: at most {counts['ptb']}") in err
    assert not (tmp_path / "s").exists()


def test_run_study_from_python_windows_the_corpora_before_the_weights(smollm2_cut_path, short_corpora, no_weights):
    from loralab.decomposition.build import run_study

    counts = token_counts(smollm2_cut_path, short_corpora)
    with pytest.raises(ConfigError) as caught:
        run_study(smollm2_cut_path, [4], ["plain"], calib_size=2, calib_seqlen=16, seq_len=5000,
                  data_dir=short_corpora)
    assert caught.value.problems == [
        f"'--seq-len' = 5000 is longer than corpus {c} ({name}: {counts[c]} tokens with this model's tokenizer): no "
        f"window to score; allowed: at most {counts[c]}" for c, name in (("wikitext2", "WikiText-2 test"),
                                                                         ("ptb", "PTB validation"))]


CALIB_SEQLEN = ("'--calib-seqlen' = 8193 is longer than the model's max_position_embeddings (8192, from its config): "
                "calibration samples would reach positions it was not trained on; allowed: at most 8192 (the official CorDA "
                "code uses 2048 for Llama-2, whose limit is 4096)")


@pytest.mark.parametrize("mode", [["--r", "4"], ["--mode", "full-decompose", "--r", "4"]], ids=["kpa", "study"])
def test_a_calib_seqlen_beyond_the_trained_positions_is_refused(smollm2_cut_path, data_dir, no_weights, capsys,
                                                                tmp_path, mode):
    assert decompose(smollm2_cut_path, data_dir, *mode, "--calib-seqlen", "8193", *(
        ["--out", str(tmp_path / "s")] if "full-decompose" in mode else [])) == 2
    err = capsys.readouterr().err
    assert "has 1 problem(s)" in err and CALIB_SEQLEN in err, err


def test_the_trained_positions_themselves_are_allowed(smollm2_cut_path):
    from loralab.decomposition.checks import position_problems
    from loralab.skeleton import model_config

    config = model_config(smollm2_cut_path, "causal_lm")
    assert position_problems(config, 8192) == [] and position_problems(config, 8193) == [CALIB_SEQLEN]


def test_build_adapter_from_python_checks_the_calibration_length_and_target_names_before_loading(
        smollm2_cut_path, data_dir, no_weights):
    from loralab.decomposition.build import build_adapter

    with pytest.raises(ConfigError) as caught:
        build_adapter(smollm2_cut_path, 4, target_modules=["q_porj", "v_proj"], calib_size=2, seqlen=8193,
                      data_dir=data_dir)
    assert caught.value.problems == [
        CALIB_SEQLEN, "'--target-modules' names 'q_porj', which matches no module of the model (did you mean "
                      "'q_proj'?)"]
    with pytest.raises(ConfigError, match=r"'--r' = 200 is larger than layer model.layers.0.self_attn.v_proj"):
        build_adapter(smollm2_cut_path, 200, target_modules=["v_proj"], calib_size=2, seqlen=16, data_dir=data_dir)


def test_a_study_r_that_empties_every_layer_is_refused_and_one_that_empties_some_warns(
        smollm2_cut_path, data_dir, no_weights, capsys, tmp_path):
    from loralab.decomposition.build import run_study

    out = ["--out", str(tmp_path / "s")]
    assert decompose(smollm2_cut_path, data_dir, "--mode", "full-decompose", "--r", "4", "576", "600", *out) == 2
    err = capsys.readouterr().err
    assert "has 2 problem(s)" in err, err
    sizes = "576->576 x4, 1536->576 x2, 576->1536 x4, 576->49152 x1, 576->192 x4"
    for r in (576, 600):
        assert (f"'--r' = {r} discards every component of all 15 linear layers (sizes in->out: {sizes}; at most "
                "min(in, out) = 576): that row would score an all-zero model; allowed: r below 576") in err
    with pytest.raises(AssertionError, match="weights were loaded"):  # r=192 empties k_proj and v_proj only: runs
        run_study(smollm2_cut_path, [192], ["plain"], calib_size=2, calib_seqlen=16, seq_len=32, data_dir=data_dir)
    assert ("warning: full-decompose study: '--r' = 192 discards every component of 4 of the 15 linear layers "
            "(sizes in->out: 576->192 x4; model.layers.0.self_attn.k_proj first): their outputs are zero in that "
            "row; r below 192 keeps every layer") in capsys.readouterr().err
