"""The CorDA workflows can be trusted as the README says (a researcher's review on SmolLM2-135M):

- ``decompose --save-path``'s adapter names the residual model as its base, so plain peft,
  ``loralab merge`` and ``loralab eval`` without a base give the decomposed model; an adapter that
  names another base (as before) is refused, naming ``--base``;
- calibration on the text an evaluation scores is warned about, captioned and recorded;
- MetaMathQA is read from the local file the training task uses, and its absence is exit 2;
- bad ranks and arguments stop before any calibration, exit 2;
- the perplexity study writes each row as it finishes, survives SIGTERM and resumes; its
  default folder is not tracked, and other settings' result files are not overwritten.

Real SmolLM2-135M cut to two decoder layers (``smollm2_cut_path``), real data, tiny calibration.
"""

import argparse
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from decompose_cli import decompose_argv

from loralab.cli import main

pytest.importorskip("attr", reason="peft's corda module imports the attrs package")

REPO = Path(__file__).resolve().parents[1]
OFFLINE = "the Hugging Face Hub (test) is unreachable from here"



def logits(model_dir, adapter=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(**tok(["who sang the song hey jude"], return_tensors="pt")).logits


@pytest.fixture(scope="module")
def ipa(smollm2_cut_path, data_dir, tmp_path_factory):
    """An IPA decomposition (v_proj, r 4) saved with --save-path: residual model + adapter."""
    out = tmp_path_factory.mktemp("corda") / "ipa"
    argv = decompose_argv(smollm2_cut_path, data_dir, "--r", "4", "--first-eigen", "--target-modules", "v_proj",
                          "--calib-dataset", "nqopen", "--save-path", str(out))
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_the_adapter_names_its_residual_model_and_plain_peft_reproduces_the_model(ipa, smollm2_cut_path):
    config = json.loads((ipa / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(ipa.resolve())
    torch.testing.assert_close(logits(config["base_model_name_or_path"], ipa / "adapter"), logits(smollm2_cut_path),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_merge_without_base_writes_the_decomposed_model(ipa, smollm2_cut_path, tmp_path):
    assert main(["merge", "--adapter", str(ipa / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(logits(tmp_path / "merged"), logits(smollm2_cut_path), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_an_adapter_recorded_on_the_original_model_is_refused(ipa, smollm2_cut_path, tmp_path, capsys, data_dir):
    from loralab.merge import residual_base_problem

    old = tmp_path / "old"  # what decompose wrote before: the residual's adapter naming the original model
    shutil.copytree(ipa / "adapter", old / "adapter")
    shutil.copy(ipa / "decompose.json", old / "decompose.json")
    path = old / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": smollm2_cut_path}))

    assert main(["merge", "--adapter", str(old / "adapter"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "corda_config" in err and f"--base {old.resolve()}" in err
    assert not (tmp_path / "m").exists()
    assert f"--model {old.resolve()}" in residual_base_problem(old / "adapter", smollm2_cut_path, flag="--model")
    assert residual_base_problem(ipa / "adapter", str(ipa)) is None  # the recorded residual: fine
    assert main(["merge", "--adapter", str(old / "adapter"), "--base", str(ipa), "--out", str(tmp_path / "m")]) == 0
    # loralab eval refuses it too, before any model loads, naming --model
    assert main(["eval", "--adapter", str(old / "adapter"), "--tasks", "gsm8k", "--max-samples", "1"]) == 2
    assert f"--model {old.resolve()}" in capsys.readouterr().err
    # an explicit --model is the user's word, as merge's --base: trusted (a residual saved by peft's own example)
    assert main(["eval", "--adapter", str(old / "adapter"), "--model", str(ipa), "--tasks", "gsm8k", "--max-samples",
                 "1", "--max-new-tokens", "1", "--data-dir", str(data_dir)]) == 0


def test_a_run_keeps_its_calibration_provenance_and_warns_of_overlap(smollm2_cut_path, data_dir, capsys):
    from loralab.config import build_parameters
    from loralab.methods.context import MethodContext
    from loralab.models import load_tokenizer

    tok = load_tokenizer(smollm2_cut_path)
    cal = {"dataset": "nqopen", "num_samples": 2, "seqlen": 16, "seed": 233}
    params = build_parameters({"task": "gsm8k", "data_dir": str(data_dir), "calibration": cal, "eval_tasks": ["nq_open"]})
    ctx = MethodContext(params, [], tok)
    assert ctx.calibration_provenance is None
    assert len(ctx.calibration_batches()) == 1
    prov = json.loads(json.dumps(ctx.calibration_provenance))  # JSON-ready, for the record
    assert prov["source"] == str((data_dir / "nq_open" / "NQ-open.dev.jsonl").resolve())
    assert (prov["split"], prov["official_split"], prov["overlaps_evaluations"]) == ("dev", "train", ["nq_open"])
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "nq_open" in err and "NQ-open.dev.jsonl" in err

    params = build_parameters({"task": "gsm8k", "data_dir": str(data_dir), "calibration": cal, "eval_tasks": ["gsm8k"]})
    ctx = MethodContext(params, [], tok)
    ctx.calibration_samples()
    assert ctx.calibration_provenance["overlaps_evaluations"] == [] and capsys.readouterr().err == ""
    params = build_parameters({"task": "gsm8k", "data_dir": str(data_dir), "calibration": {"num_samples": 2}})
    ctx = MethodContext(params, [{"input_ids": [1, 2], "attention_mask": [1, 1]}] * 3, tok)
    ctx.calibration_samples()
    assert ctx.calibration_provenance == {"source": "task", "task": "gsm8k", "split": "train", "num_samples": 2,
                                          "seed": 0, "sampling": "random", "overlaps_evaluations": []}


def test_the_study_warns_and_captions_calibration_on_its_scored_text(smollm2_cut_path, data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    argv = decompose_argv(smollm2_cut_path, data_dir, "--mode", "full-decompose", "--r", "0", "--method", "plain",
                          "--calib-dataset", "wikitext2", "--seq-len", "32", "--max-windows", "1", "--out", str(out))
    assert main(argv) == 0
    wiki = str((data_dir / "wikitext-2" / "wiki.test.raw").resolve())
    captured = capsys.readouterr()
    err = captured.err
    assert "warning: full-decompose study" in err and wiki in err and "wikitext2" in err
    md = (out / "full_decompose.md").read_text()
    caption = md.split("| method |")[0]
    assert f"from `{wiki}`, test split" in caption and "not the train split" in caption
    assert "Calibrated on the evaluation data" in caption and str((data_dir / "ptb" / "ptb.valid.txt").resolve()) in caption
    assert "(plain text, random, seed 233)" in caption and "llama2-chat" not in caption  # a corpus has no prompt format
    study = json.loads((out / "full_decompose.json").read_text())
    rows, meta = study["rows"], study["meta"]
    assert meta["overlap"] == ["wikitext2"] and meta["calibration"]["split"] == "test"
    log = captured.out  # each row one readable line, not a Python dict
    assert f"base model: wikitext2 perplexity {rows[0]['wikitext2']:,.3f}, ptb perplexity {rows[0]['ptb']:,.3f}\n" in log
    assert "{'method'" not in log and f"study written: json {out / 'full_decompose.json'}, md " in log, log


@pytest.mark.slow
def test_the_study_keeps_finished_rows_through_sigterm_and_resumes(smollm2_cut_path, data_dir, tmp_path, monkeypatch,
                                                                    capsys):
    import loralab.tasks.perplexity as ppl_module

    real = ppl_module.perplexity
    calls = []

    def perplexity(*args, **kwargs):
        calls.append(kwargs.get("progress"))
        if len(calls) == 3:  # the first corpus of the second row
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                raise AssertionError("SIGTERM would kill the study: no handler")
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(ppl_module, "perplexity", perplexity)
    out = tmp_path / "study"
    argv = decompose_argv(smollm2_cut_path, data_dir, "--mode", "full-decompose", "--r", "4", "--method", "plain",
                          "--seq-len", "32", "--max-windows", "1", "--out", str(out))
    assert main(argv) == 130
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
    first = json.loads((out / "full_decompose.json").read_text())["rows"]
    assert [(r["method"], r["r"]) for r in first] == [("base", 0)]
    assert "| base | 0 |" in (out / "full_decompose.md").read_text()
    assert "run the same command again" in capsys.readouterr().err

    calls.clear()
    assert main(argv) == 0
    assert len(calls) == 2 and all(calls)  # only the plain row's two corpora, with a progress bar
    log = capsys.readouterr().out
    assert "1 of 2 row(s) already there, skipped (base r=0)" in log and "[row 2/2] plain r=4: scoring" in log
    rows = json.loads((out / "full_decompose.json").read_text())["rows"]
    assert rows[0] == first[0] and [(r["method"], r["r"]) for r in rows] == [("base", 0), ("plain", 4)]
    assert (out / "full_decompose.png").exists()
@pytest.mark.slow  # over 2 s on 2 cores: the full suite runs it (the fast subset's 2-minute budget)
def test_the_study_writes_outside_results_and_overwrites_nothing_unasked(smollm2_cut_path, data_dir, tmp_path,
                                                                         capsys):
    from loralab.commands import decompose

    parser = argparse.ArgumentParser()
    decompose.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--r", "8", "--mode", "full-decompose"])
    default = Path(decompose.study_out(args)).resolve()
    assert default == (Path(os.environ["LORALAB_OUTPUT_DIR"]) / "corda-study").resolve()
    assert not default.is_relative_to(REPO / "results")

    out = tmp_path / "study"
    argv = decompose_argv(smollm2_cut_path, data_dir, "--mode", "full-decompose", "--r", "0", "--seq-len", "32",
                          "--max-windows", "1", "--out", str(out))
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = [a if a != "32" else "16" for a in argv]  # --seq-len 16: another study
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "seq_len: 32 there, 16 now" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(argv) == 0 and {p.name: p.read_bytes() for p in out.iterdir()} == before  # same study: nothing to do
    assert main([*other, "--force"]) == 0
    assert json.loads((out / "full_decompose.json").read_text())["meta"]["seq_len"] == 16


def test_offline_metamath_calibration_exits_2_naming_the_files(smollm2_cut_path, data_dir, monkeypatch, capsys):
    import loralab.models

    monkeypatch.setattr(loralab.models, "hub_offline_reason", lambda: OFFLINE)
    argv = decompose_argv(smollm2_cut_path, data_dir, "--r", "4", "--first-eigen", "--target-modules", "v_proj",
                          "--calib-dataset", "MetaMATH")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(data_dir / "metamath" / "MetaMathQA-395K.json") in err and "GSM8K_test.jsonl" in err and OFFLINE in err


def test_a_local_metamathqa_file_is_the_metamath_calibration_set(smollm2_cut_path, data_dir, tmp_path, monkeypatch):
    import loralab.models
    from loralab.decomposition.calibration import calibration_samples
    from loralab.models import load_tokenizer

    monkeypatch.setattr(loralab.models, "hub_offline_reason", lambda: OFFLINE)
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]]
    local = tmp_path / "data" / "metamath" / "MetaMathQA-395K.json"  # MetaMathQA's fields, real GSM8K rows
    local.parent.mkdir(parents=True)
    local.write_text(json.dumps([{"query": r["question"], "response": r["answer"], "type": "GSM_Rephrased"}
                                 for r in rows]))
    samples, prov = calibration_samples("metamath", load_tokenizer(smollm2_cut_path), 2, seqlen=32,
                                        data_dir=tmp_path / "data")
    assert len(samples) == 2 and prov["source"] == str(local.resolve())
    assert (prov["split"], prov["official_split"]) == ("train", "train") and "note" not in prov


@pytest.mark.parametrize("extra, messages", [
    (["--r", "200"], ["'--r' = 200 is larger than layer model.layers.0.self_attn.k_proj (576->192) allows (at most 192)",
                      "and 3 more of the 14 targeted layers"]),
    (["--r", "0", "--calib-size", "0"], ["'--r' = 0: the adapter rank must be at least 1",
                                         "'--calib-size' = 0 must be a positive integer"]),
    (["--r", "4", "--target-modules", "q_porj"], ["'--target-modules' names 'q_porj', which matches no module of "
                                                 "the model (did you mean 'q_proj'?)"]),
])
def test_bad_ranks_and_arguments_exit_2_before_any_calibration(smollm2_cut_path, data_dir, monkeypatch, capsys,
                                                                 extra, messages):
    import loralab.decomposition.build as build

    def calibrated(*args, **kwargs):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(build, "calibration_batches", calibrated)
    assert main(decompose_argv(smollm2_cut_path, data_dir, "--calib-dataset", "nqopen", *extra)) == 2
    err = capsys.readouterr().err
    assert all(m in err for m in messages), err
