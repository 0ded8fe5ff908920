"""Perplexity (CorDA's evaluate_model) and the full-decompose study on the real SmolLM2-135M."""

import math

import pytest
import torch

from loralab.decomposition.calibration import calibration_samples, canonical_name, make_batches
from loralab.decomposition.study import calibrate, factor, full_decompose, linear_layers, truncated, untie_output
from loralab.tasks.perplexity import load_corpus, perplexity


@pytest.fixture(scope="module")
def smol(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32), tok


def test_load_corpus_reads_local_files(data_dir):
    wiki = load_corpus("wikitext2", data_dir)
    ptb = load_corpus("ptb", data_dir)
    assert "Robert Boulter" in wiki[:200] and "\n\n" in wiki
    assert len(ptb) > 350_000 and not ptb.startswith(" ")
    with pytest.raises(ValueError, match="known: wikitext2, ptb"):
        load_corpus("c5", data_dir)


def test_perplexity_matches_the_models_own_loss(smol, data_dir):
    model, tok = smol
    ids = tok(load_corpus("wikitext2", data_dir)[:4000], return_tensors="pt").input_ids[0]
    ppl = perplexity(model, tok, ids, seq_len=64, max_windows=2)
    with torch.no_grad():
        losses = [model(input_ids=ids[i * 64:(i + 1) * 64][None], labels=ids[i * 64:(i + 1) * 64][None]).loss
                  for i in range(2)]
    assert ppl == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-4)
    assert 1 < ppl < 200
    # batching windows changes nothing; sliding windows with more context give a lower perplexity
    assert perplexity(model, tok, ids, seq_len=64, max_windows=2, batch_size=2) == pytest.approx(ppl, rel=1e-4)
    sliding = perplexity(model, tok, ids[: 2 * 64], seq_len=64, stride=32)
    assert sliding < ppl
@pytest.mark.slow  # over 2 s on 2 cores: the full suite runs it (the fast subset's 2-minute budget)
def test_max_samples_scores_the_first_windows_and_says_so(smol, data_dir, capsys):
    """``loralab eval --tasks wikitext2 --max-samples N`` used to score the whole corpus (the option was dropped,
    and no bar showed): N windows now, and the metrics say how many of how many, and how many tokens."""
    from loralab.tasks.evaluate import run_eval

    model, tok = smol
    metrics, _ = run_eval("wikitext2", model, tok, data_dir=data_dir, options={"wikitext2": {"seq_len": 64}},
                          max_samples=2)
    ids = tok(load_corpus("wikitext2", data_dir), return_tensors="pt").input_ids[0]
    assert metrics["windows"] == 2 and metrics["windows_total"] == ids.numel() // 64 and metrics["tokens"] == 2 * 63
    assert metrics["perplexity"] == pytest.approx(perplexity(model, tok, ids, seq_len=64, max_windows=2), rel=1e-6)
    assert "wikitext2 perplexity" in capsys.readouterr().err  # the bar


@pytest.mark.slow
def test_full_decompose_r0_reproduces_base_and_r_hurts(smol, data_dir):
    base, tok = smol
    import copy

    model = copy.deepcopy(base)
    untie_output(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert "lm_head" in linear_layers(model)  # the output layer is decomposed too
    # restrict to two layers to stay fast: check the factorisations on them, and the study loop
    keep = {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
    samples, _ = calibration_samples("alpaca", tok, 8, seqlen=64, data_dir=data_dir)
    stats = calibrate(model, make_batches(samples, 4, tok.pad_token_id), progress=False, names=keep)
    assert set(stats) == keep
    ids = tok(load_corpus("ptb", data_dir)[:3000], return_tensors="pt").input_ids[0]
    base_ppl = perplexity(model, tok, ids, seq_len=64, max_windows=2)
    layers = linear_layers(model)
    for name in keep:
        w = layers[name].weight.detach()
        for method in ("cov-aware", "act-aware", "plain"):
            U, S, V = factor(w, method, stats[name])
            torch.testing.assert_close(truncated(U, S, V, 0), w, rtol=1e-3, atol=1e-4)
    res = full_decompose(model, stats, "cov-aware", [0, 200], lambda m: perplexity(m, tok, ids, seq_len=64, max_windows=2),
                         names=keep, progress=False)
    assert res[0] == pytest.approx(base_ppl, rel=1e-3)
    assert res[200] > res[0] * 1.001
    assert perplexity(model, tok, ids, seq_len=64, max_windows=2) == pytest.approx(base_ppl, rel=1e-6)  # restored


def test_calibration_names_and_formats(smol, data_dir):
    _, tok = smol
    assert canonical_name("traivia_qa") == "triviaqa"
    with pytest.raises(ValueError, match="did you mean 'nqopen'"):
        canonical_name("nqopne")
    a, prov = calibration_samples("nqopen", tok, 3, seqlen=32, data_dir=data_dir)
    b, _ = calibration_samples("nqopen", tok, 3, seqlen=32, data_dir=data_dir)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and all(len(x) == 32 for x in a)  # seeded, full windows
    assert "nq_open" in prov["source"] and prov["seed"] == 233
    chat, _ = calibration_samples("alpaca", tok, 2, seqlen=512, data_dir=data_dir)
    train, _ = calibration_samples("alpaca", tok, 2, seqlen=512, data_dir=data_dir, fmt="training")
    assert "[INST] <<SYS>>" in tok.decode(chat[0]) and "### Response:" in tok.decode(train[0])
    batch = make_batches(chat + train, 3, tok.pad_token_id, "left")[0]
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()


def test_ptb_scores_the_validation_split_as_cordas_study_does(data_dir):
    """CorDA's evaluate_model scores PTB's validation split (seed 001's Fig. 2 / Table 6), not test; a calibration
    on the local PTB file reads test, so calibrating and scoring never share text."""
    from loralab.decomposition.calibration import _LOCAL

    valid = (data_dir / "ptb" / "ptb.valid.txt").read_text().splitlines()
    assert load_corpus("ptb", data_dir) == "\n\n".join(line.strip() for line in valid if line.strip())
    assert _LOCAL["ptb"][0][0] != "ptb/ptb.valid.txt"
