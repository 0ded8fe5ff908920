"""Issue 21, point 3: one rule for degenerate metrics (``loralab.tasks.metrics``). The failing input:
a constant STS-B prediction gave Pearson NaN (recorded as ``"pearson": NaN``, shown as
``nan ± nan``, counted as a tie). Variants: Spearman and MCC of a constant, F1 without a positive
prediction, non-finite predictions of a diverged model, an overflowing perplexity, records written
before the rule. Real GLUE dev labels, the real MiniLM-L6 and SmolLM2 where a model is needed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from report_records import make_record, write

from loralab.config import build_parameters
from loralab.report import build_report
from loralab.report.render import to_csv, to_json, to_markdown
from loralab.report.stats import paired
from loralab.tasks import get_task
from loralab.tasks.glue import compute_metrics
from loralab.tasks.metrics import DEGENERATE, WORST_LOWER_IS_BETTER, flagged, numbers, settle


def _labels(data_dir, task: str) -> np.ndarray:
    rows, _ = get_task(task).read("dev", data_dir)
    return np.asarray([label for _, label in rows], dtype=float)


def _strict(metrics: dict) -> None:
    json.dumps(metrics, allow_nan=False)  # raises on NaN / infinity
    assert all(math.isfinite(v) for v in numbers(metrics).values())


def test_constant_stsb_prediction_is_zero_and_flagged_not_nan(data_dir):
    refs = _labels(data_dir, "glue/stsb")
    m = compute_metrics(("pearson", "spearmanr"), np.full(refs.shape, 2.5, dtype=np.float32), refs)
    assert m == {"pearson": 0.0, "spearmanr": 0.0, DEGENERATE: ["pearson", "spearmanr"]}
    _strict(m)


def test_real_predictions_are_scipys_numbers_and_not_flagged(data_dir):
    from scipy.stats import pearsonr, spearmanr

    refs = _labels(data_dir, "glue/stsb")
    preds = refs + np.random.default_rng(0).normal(0, 1.0, refs.shape)
    m = compute_metrics(("pearson", "spearmanr"), preds, refs)
    assert m == {"pearson": float(pearsonr(preds, refs)[0]), "spearmanr": float(spearmanr(preds, refs)[0])}


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_regression_predictions_are_flagged(data_dir, bad):
    refs = _labels(data_dir, "glue/stsb")
    preds = refs.copy()
    preds[3] = bad  # one diverged output poisons scipy's correlation
    m = compute_metrics(("pearson", "spearmanr"), preds, refs)
    assert flagged(m) == {"pearson", "spearmanr"} and numbers(m) == {"pearson": 0.0, "spearmanr": 0.0}
    _strict(m)


@pytest.mark.parametrize("constant", [0, 1])
def test_constant_cola_classifier_mcc_is_zero_and_flagged_accuracy_is_not(data_dir, constant):
    refs = _labels(data_dir, "glue/cola").astype(int)
    m = compute_metrics(("matthews_correlation", "accuracy"), np.full(refs.shape, constant), refs)
    assert m["matthews_correlation"] == 0.0 and m[DEGENERATE] == ["matthews_correlation"]
    assert m["accuracy"] == pytest.approx((refs == constant).mean())
    _strict(m)


def test_mrpc_without_positive_predictions_has_degenerate_f1(data_dir):
    refs = _labels(data_dir, "glue/mrpc").astype(int)
    m = compute_metrics(("accuracy", "f1"), np.zeros_like(refs), refs)
    assert m["f1"] == 0.0 and m[DEGENERATE] == ["f1"] and m["accuracy"] == pytest.approx(1 - refs.mean())
    all_positive = compute_metrics(("accuracy", "f1"), np.ones_like(refs), refs)  # precision defined: a real F1
    assert DEGENERATE not in all_positive and all_positive["f1"] == pytest.approx(2 * refs.mean() / (1 + refs.mean()))


def test_empty_evaluation_is_flagged_not_nan():
    m = compute_metrics(("accuracy", "f1"), np.array([], dtype=int), np.array([], dtype=int))
    assert m == {"accuracy": 0.0, "f1": 0.0, DEGENERATE: ["accuracy", "f1"]}


def test_settle_takes_every_non_finite_value_to_its_convention():
    m = settle({"perplexity": math.inf, "loss": math.nan, "accuracy": 0.5, "n": 7, "headline": "accuracy",
                "exact_match": np.float64("nan")})
    assert m == {"perplexity": WORST_LOWER_IS_BETTER, "loss": WORST_LOWER_IS_BETTER, "accuracy": 0.5, "n": 7,
                 "headline": "accuracy", "exact_match": 0.0, DEGENERATE: ["perplexity", "loss", "exact_match"]}
    _strict(m)
    assert settle({"accuracy": 0.5}) == {"accuracy": 0.5}  # nothing degenerate: no key


@pytest.mark.slow
def test_constant_minilm_regressor_on_stsb_is_scored_by_the_rule(minilm_path, data_dir):
    """As a user meets it: a collapsed STS-B model (the regression head's weight at 0) evaluated by
    the task's own evaluate."""
    from loralab.models import load_model, load_tokenizer

    task = get_task("glue/stsb")
    tok = load_tokenizer("packaged:minilm-l6")
    params = build_parameters({"task": "glue/stsb", "data_dir": str(data_dir), "max_length": 64,
                               "max_train_samples": 8, "max_eval_samples": 48, "eval_batch_size": 16})
    data = task.load(params, tok)
    model = load_model("packaged:minilm-l6", "seq_cls", 1).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
    m = task.evaluate(model, tok, data, params)
    loss = m.pop("loss")  # the dev MSE of a constant prediction: finite, not degenerate
    assert m == {"pearson": 0.0, "spearmanr": 0.0, DEGENERATE: ["pearson", "spearmanr"]} and 0 < loss < 50


def test_overflowing_perplexity_is_degenerate_not_an_error(smollm2_path, data_dir, monkeypatch):
    """SmolLM2 with its logits blown up: mean NLL past log(float max) made math.exp raise; now the
    perplexity is inf and the evaluation records the convention, flagged."""
    from loralab.models import load_model, load_tokenizer
    from loralab.tasks import language_modeling, perplexity

    tok = load_tokenizer("packaged:smollm2-135m")
    model = load_model("packaged:smollm2-135m", "causal_lm").eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(1e4)  # logits ×1e4: the wrong tokens' NLL runs to thousands of nats
    text = perplexity.load_corpus("wikitext2", data_dir)[:4000]
    ppl = perplexity.perplexity(model, tok, text, seq_len=64, max_windows=1)
    assert ppl == math.inf or math.isnan(ppl)
    monkeypatch.setattr(perplexity, "load_corpus", lambda name, data_dir: text)
    m = language_modeling.run("wikitext2", model, tok, data_dir=data_dir,
                              options={"seq_len": 64, "stride": None, "batch_size": 1}, max_samples=1)
    counts = {"windows": 1, "windows_total": len(tok(text).input_ids) // 64, "tokens": 63}
    assert m == {"perplexity": WORST_LOWER_IS_BETTER, DEGENERATE: ["perplexity"], **counts}
    _strict(m)


# ---- the report ------------------------------------------------------------------------------------
def _stsb(folder, method, seed, pearson, degenerate=False, name=None):
    metrics = {"pearson": pearson, "spearmanr": pearson}
    if degenerate:
        metrics[DEGENERATE] = ["pearson", "spearmanr"]
    rec = make_record(method, "stsb", name=name or f"set/{method}/stsb", seed=seed, metrics=metrics)
    write(folder, f"{method}-{seed}.json", json.dumps(rec, allow_nan=True))


def test_report_marks_degenerate_cells_and_counts_them_as_losses(tmp_path):
    for seed in range(3):
        _stsb(tmp_path, "lora", seed, 0.80 + seed / 100)
    _stsb(tmp_path, "pissa", 0, 0.0, degenerate=True)  # the collapsed seed
    _stsb(tmp_path, "pissa", 1, 0.85)
    _stsb(tmp_path, "pissa", 2, 0.86)
    report = build_report([tmp_path])
    assert not report.problems
    (t,) = report.tables
    cell = t.cells[("PiSSA", "glue/stsb")]
    assert cell.degenerate == 1 and cell.values == pytest.approx([0.0, 85.0, 86.0])
    md = to_markdown(report)
    assert "‡1" in md and "degenerate" in md and "nan" not in md.lower()
    (cmp,) = t.comparisons
    assert (cmp.a, cmp.b, cmp.wins, cmp.losses, cmp.ties) == ("PiSSA", "LoRA", 2, 1, 0)
    cells = {c["row"]: c for c in json.loads(to_json(report))["tables"][0]["cells"]}
    assert cells["PiSSA"]["degenerate_seeds"] == [0] and cells["LoRA"]["degenerate_seeds"] == []
    assert "degenerate_seeds" in to_csv(report).splitlines()[0]
    json.loads(to_json(report), parse_constant=lambda c: pytest.fail(f"report JSON holds {c}"))


def test_record_written_before_the_rule_with_nan_is_read_as_degenerate(tmp_path):
    for seed in range(2):
        _stsb(tmp_path, "lora", seed, 0.8)
        _stsb(tmp_path, "pissa", seed, float("nan") if seed == 0 else 0.9)
    report = build_report([tmp_path])
    assert not report.problems
    (t,) = report.tables
    pissa = t.cells[("PiSSA", "glue/stsb")]
    assert pissa.degenerate == 1 and pissa.values == pytest.approx([0.0, 90.0])
    md = to_markdown(report)
    assert "nan" not in md.lower() and "‡1" in md
    (cmp,) = t.comparisons
    assert (cmp.wins, cmp.losses, cmp.ties) == (1, 1, 0)  # was a tie: NaN − 0.8 is neither > 0 nor < 0


def test_a_degenerate_flag_naming_no_metric_is_a_problem(tmp_path):
    rec = make_record("lora", "stsb", name="set/lora/stsb", seed=0,
                      metrics={"pearson": 0.0, DEGENERATE: ["pearsonr"]})
    write(tmp_path, "bad.json", rec)
    report = build_report([tmp_path])
    assert any("eval.degenerate names 'pearsonr'" in p.reason for p in report.problems)


@pytest.mark.parametrize("a_deg, b_deg, a, b, expected", [
    (True, False, 0.0, -0.02, (0, 1, 0)),   # degenerate 0 loses to a real negative correlation
    (False, True, -0.02, 0.0, (1, 0, 0)),
    (True, True, 0.0, 0.0, (0, 0, 1)),      # both collapsed: a tie
    (False, False, 0.5, 0.5, (0, 0, 1)),
])
def test_paired_rule_for_one_degenerate_pair(a_deg, b_deg, a, b, expected):
    key = ("glue/stsb", 0)
    res = paired("A", {key: a}, "B", {key: b}, {key} if a_deg else set(), {key} if b_deg else set())
    assert (res.wins, res.losses, res.ties) == expected
