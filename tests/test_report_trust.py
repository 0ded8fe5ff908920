"""What a reader can trust in `loralab report`: a --metric no record holds is an error (and one some groups lack
is a note), a score on a subset of the evaluation set says so and is never set beside a full one, a run scored on
several evaluations gets one column per evaluation with their average, and two experiment folders are two rows
(only a re-run of one folder supersedes). Built from the real MiniLM records (tests/report_records.py) and the
committed results/svd-family records."""

from __future__ import annotations

import csv
import io
import json

import pytest
from report_records import GLUE_MINILM, REPO, make_record, write

from loralab.cli import main
from loralab.report import build_report
from loralab.report.render import to_csv, to_json, to_markdown

# --- 1: --metric checked against what the records hold --------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--metric", "nonsense_metric"], "--metric 'nonsense_metric': no record holds the metric 'nonsense_metric'; "
                                      "they hold: accuracy, f1, pearson, spearmanr"),
    (["--metric", "acuracy"], "(did you mean 'accuracy'?)"),
    (["--metric", "glue/mrcp=f1"], "no run of task 'glue/mrcp' (did you mean 'glue/mrpc'"),
    (["--metric", "glue/rte=f1"], "no record of task 'glue/rte' holds the metric 'f1'; they hold: accuracy"),
])
def test_a_metric_no_record_holds_exits_2_naming_the_ones_they_hold(argv, message, capsys):
    assert main(["report", str(GLUE_MINILM), *argv]) == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""


def test_a_metric_some_groups_lack_is_a_note_naming_them(capsys):
    assert main(["report", str(GLUE_MINILM), "--metric", "f1"]) == 0
    md, err = capsys.readouterr()
    note = "--metric 'f1': no cell for glue-minilm · RTE, glue-minilm · STS-B, whose runs did not record 'f1'"
    assert f"note: {note}" in err
    assert "### Notes" in md and note in md and "MRPC f1" in md
    assert json.loads(to_json(build_report([GLUE_MINILM], metrics=["f1"])))["notes"][0].startswith(note)


# --- 2: scores on a subset of the evaluation set --------------------------------------------------

def _math(folder, method, *, cap, n, accuracy, seed=0, name=None):
    """A MATH run's record: the flat eval an SFT run writes (``math/accuracy``, ``math/n``)."""
    rec = make_record(method, "mrpc", name=name or f"sft/{method}", seed=seed, metrics={"math/accuracy": accuracy,
                      "math/n": n}, params={"task": "metamath", "max_eval_samples": cap,
                                            "generation": {"max_new_tokens": 64 if cap else 512}})
    rec["meta_info"]["dataset"] = {"task": "metamath", "headline": "math/accuracy",
                                   "evaluations": {"math": {"headline": "accuracy"}}}
    write(folder, f"{method}-{cap}-{seed}.json", rec)


def test_a_subset_score_shows_its_example_count_and_is_kept_apart(tmp_path):
    _math(tmp_path, "lora", cap=4, n=4, accuracy=0.25)  # issue: read as `25.00 (n=1)†`, a full 5,000-problem score
    _math(tmp_path, "dora", cap=None, n=5000, accuracy=0.30)
    _math(tmp_path, "pissa", cap=10_000, n=5000, accuracy=0.28)  # a cap above the set's size: the whole set
    report = build_report([tmp_path])
    full, subset = report.tables
    assert full.rows == ["DoRA", "PiSSA"] and full.max_eval_samples is None and "max_eval_samples" not in full.title
    assert subset.rows == ["LoRA"] and subset.max_eval_samples == 4 and not subset.comparisons
    assert subset.title.endswith("each evaluation scored on at most its first 4 examples (max_eval_samples 4)")
    md = to_markdown(report)
    assert "| LoRA | 5.46M | 25.00 (n=1)† §4 |" in md
    assert "§k: each run scored on k examples, the first k of the evaluation set (max_eval_samples 4)" in md
    assert "| DoRA | 5.48M | **30.00** (n=1)† |" in md and "LoRA −" not in md and "− LoRA" not in md
    rows = {r["row"]: r for r in csv.DictReader(io.StringIO(to_csv(report)))}
    assert (rows["LoRA"]["eval_examples"], rows["LoRA"]["max_eval_samples"]) == ("4", "4")
    assert (rows["DoRA"]["eval_examples"], rows["DoRA"]["max_eval_samples"]) == ("5000", "")
    tables = json.loads(to_json(report))["tables"]
    assert [(t["max_eval_samples"], t["cells"][0]["eval_examples"]) for t in tables] == [(None, [5000]), (4, [4])]


def test_a_capped_glue_run_without_a_count_is_marked_at_most(tmp_path):
    write(tmp_path, "a.json", make_record(name="q/lora/mrpc", params={"max_eval_samples": 100}))
    md = to_markdown(build_report([tmp_path]))
    assert "70.83 (n=1)† §≤100" in md  # GLUE records hold no count: at most the cap


# --- 3: one column per evaluation, with their average ----------------------------------------------

EVALS = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa"]


def _commonsense(folder):
    """LoRA and DoRA on commonsense170k, three seeds: evaluation i scores 0.50 + 0.03 i (+0.02 for DoRA), and
    seed s adds 0.01 s to boolq only, so the seeds' averages over the eight differ by 0.01 s / 8."""
    for method in ("lora", "dora"):
        for seed in range(3):
            metrics = {}
            for i, e in enumerate(EVALS):
                metrics[f"{e}/accuracy"] = 0.50 + 0.03 * i + (0.02 if method == "dora" else 0) + (0.01 * seed if i == 0 else 0)
                metrics[f"{e}/n"] = 500 + i
            rec = make_record(method, "mrpc", name=f"cs/{method}", seed=seed, metrics=metrics,
                              params={"task": "commonsense170k"})
            rec["meta_info"]["dataset"] = {"task": "commonsense170k", "headline": "boolq/accuracy",
                                           "evaluations": {e: {"headline": "accuracy"} for e in EVALS}}
            write(folder, f"{method}{seed}.json", rec)


def test_commonsense_runs_get_a_column_per_evaluation_and_their_average(tmp_path, capsys):
    _commonsense(tmp_path)
    report = build_report([tmp_path])
    single, by_eval = report.tables
    assert single.cols == ["commonsense170k"] and single.cells[("LoRA", "commonsense170k")].metric == "boolq/accuracy"
    assert by_eval.col_field == "evaluation" and by_eval.cols == EVALS  # the order the runs recorded (the paper's)
    assert by_eval.title == "cs · commonsense170k: accuracy by evaluation (×100)"
    assert by_eval.cells[("DoRA", "hellaswag")].values == pytest.approx([61.0, 61.0, 61.0])  # 50 + 3·3 + 2
    # hand: LoRA's average over the eight is 50 + 3·(0+…+7)/8 = 60.5, plus seed s's boolq 1·s / 8
    avg = by_eval.avg["LoRA"]
    assert avg.n == 3 and avg.mean == pytest.approx(60.625) and avg.sd == pytest.approx(0.125)
    assert ("DoRA", "avg") in by_eval.best
    (cmp,) = by_eval.comparisons  # DoRA − LoRA: +2 on each of 8 evaluations × 3 seeds
    assert cmp.n == 24 and cmp.mean_diff == pytest.approx(2.0)
    md = to_markdown(report)
    assert "| method | trainable params | commonsense170k (boolq/accuracy) |" in md  # the headline column names its metric
    assert "| method | trainable params | boolq | piqa | social_i_qa | hellaswag | winogrande | ARC-Challenge | ARC-Easy" \
           " | openbookqa | avg |" in md
    assert "| DoRA − LoRA | 24 (8 × 3) |" in md and "pairs (evaluations × seeds)" in md
    # asked for: --by method,evaluation gives that table alone; --metric NAME then means each evaluation's NAME
    assert main(["report", str(tmp_path), "--by", "method,evaluation", "--metric", "accuracy", "--format", "json"]) == 0
    (table,) = json.loads(capsys.readouterr().out)["tables"]
    assert table["columns"] == EVALS and table["average"]["LoRA"]["mean"] == pytest.approx(60.625)


# --- 4: a record's identity includes its experiment --------------------------------------------------

def test_two_experiment_folders_are_two_rows_and_a_rerun_of_one_supersedes(tmp_path):
    for name, acc, stamp in [("set/lora-long", 0.70, "2026-11-22T23:00:00+00:00"),
                             ("set/lora-long-ref", 0.72, "2026-11-22T23:10:00+00:00"),
                             ("set/lora-long", 0.71, "2026-11-23T08:00:00+00:00")]:  # the first folder run again
        write(tmp_path, f"{name.replace('/', '-')}-{stamp[:13]}.json",
              make_record(name=name, metrics={"accuracy": acc}, stamp=stamp))
    report = build_report([tmp_path])
    (t,) = report.tables
    assert set(t.rows) == {"LoRA [lora-long]", "LoRA [lora-long-ref]"}
    assert t.cells[("LoRA [lora-long]", "glue/mrpc")].values == pytest.approx([71.0])  # the newer run of the folder
    assert t.cells[("LoRA [lora-long-ref]", "glue/mrpc")].values == pytest.approx([72.0])
    ((old, new),) = report.superseded
    assert (old.experiment, new.experiment, old.created_at) == ("set/lora-long", "set/lora-long", "2026-11-22T23:00:00+00:00")
    assert "(a re-run of the same experiment, task, seed and configuration)" in to_markdown(report)


def test_one_folder_per_seed_stays_one_row_and_committed_studies_are_not_superseded():
    # svd-family/tuned keeps each seed in its own folder (…/pissa/stsb/seed0): seeds of one row, no tag
    tuned = REPO / "results" / "svd-family" / "tuned"
    (t,) = build_report([tuned]).tables
    assert "PiSSA" in t.rows and t.cells[("PiSSA", "glue/stsb")].summary.n == 3
    # read together with seed000-lr, the two studies' identical configurations were 45 "superseded" runs
    report = build_report([tuned, REPO / "results" / "svd-family" / "seed000-lr"])
    assert report.superseded == []
    (t,) = report.tables
    assert {"PiSSA (lr=4e-05) [seed000-lr/pissa]", "PiSSA (lr=4e-05) [tuned/pissa]"} <= set(t.rows)
