"""loralab report: statistics against hand-computed values, grouping by what each run recorded
(never by folder position), unreadable files named and skipped, every output format."""

from __future__ import annotations

import csv
import io
import itertools
import json

import numpy as np
import pytest
from report_records import GLUE_MINILM, make_record, write

from loralab.cli import main
from loralab.report import build_report
from loralab.report.render import to_markdown
from loralab.report.stats import paired, pareto_front, summarize

# --- statistics, against values worked out by hand ------------------------------------------------

def test_summary_of_three_seeds():
    # mean 1, sd sqrt(((0-1)^2 + 0 + (2-1)^2) / 2) = 1. Percentile bootstrap: a resample is all
    # zeros with probability 1/27 = 3.7 % > 2.5 %, all twos likewise, so the interval is [0, 2].
    s = summarize([0.0, 1.0, 2.0])
    assert (s.mean, s.sd, s.low, s.high, s.n) == (1.0, 1.0, 0.0, 2.0, 3)


def test_one_seed_has_no_spread_and_identical_seeds_a_point_interval():
    one = summarize([0.7])
    assert (one.mean, one.sd, one.low, one.high, one.n) == (0.7, None, None, None, 1)
    same = summarize([0.5, 0.5, 0.5])
    assert (same.sd, same.low, same.high) == (0.0, 0.5, 0.5)


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    # all 5^5 = 3125 equally likely resamples of five seeds, enumerated: the exact percentile interval
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    means = np.sort([np.mean(c) for c in itertools.product(values, repeat=5)])
    exact_low, exact_high = np.percentile(means, 2.5), np.percentile(means, 97.5)
    s = summarize(values)
    assert s.mean == 4.0 and s.sd == pytest.approx(np.sqrt(50 / 4))
    assert s.low == pytest.approx(exact_low, abs=0.25) and s.high == pytest.approx(exact_high, abs=0.25)
    assert s.low < s.mean < s.high


def test_paired_comparison_sign_test_and_difference():
    # A wins 5 times, loses once, ties once (dropped): two-sided sign test p = 2 * P(X >= 5 | n=6, 1/2)
    # = 2 * (6 + 1) / 64 = 0.21875.
    a = {("mrpc", s): v for s, v in enumerate([80, 81, 82, 83, 84, 70, 60])}
    b = {("mrpc", s): v for s, v in enumerate([79, 80, 81, 82, 83, 75, 60])}
    b[("rte", 0)] = 50  # no partner in A: not a pair
    res = paired("A", a, "B", b)
    assert (res.n, res.wins, res.losses, res.ties) == (7, 5, 1, 1)
    assert res.p == pytest.approx(0.21875)
    assert res.mean_diff == pytest.approx((5 * 1 - 5 + 0) / 7)
    assert res.low <= res.mean_diff <= res.high


def test_pareto_front():
    # (cost, score): (3, 60) is dominated by (2, 60); (2, 55) by (2, 60); the cheapest point is on the front
    points = [(1, 50), (2, 60), (2, 55), (3, 60), (0.5, 40), (float("nan"), 99)]
    assert pareto_front(points) == [0, 1, 4]


# --- grouping by what the run recorded --------------------------------------------------------------

def _lorafa_svd(folder):
    """Issue 12 item 8: experiments/lorafa-svd/<task>/<init>-r<r>-lr<lr> (task before init)."""
    for task, init, r, acc in [("mrpc", "svd_lorafa", 4, 0.70), ("mrpc", "svd_lorafa_corrected", 4, 0.80),
                               ("rte", "svd_lorafa", 4, 0.55), ("rte", "svd_lorafa_corrected", 4, 0.60),
                               ("mrpc", "svd_lorafa", 2, 0.65)]:
        rec = make_record("lora", task, name=f"lorafa-svd/{task}/{init}-r{r}-lr0.0004", metrics={"accuracy": acc},
                          params={"init": init, "optimizer": "lorafa", "learning_rate": 4e-4}, adapter={"r": r})
        rec["run_info"]["method"] = "svd_lorafa"
        write(folder, f"lorafa-svd--{task}--{init}-r{r}.json", rec)


def test_lorafa_svd_rows_are_the_recorded_inits_not_the_folder_position(tmp_path):
    _lorafa_svd(tmp_path)
    report = build_report([tmp_path])
    (t,) = report.tables
    assert t.cols == ["glue/mrpc", "glue/rte"]
    # one row per recorded init; the two ranks of one init are variants, named by the key that differs
    assert t.rows == ["SVD LoRA-FA (r=2)", "SVD LoRA-FA (r=4)", "SVD LoRA-FA corrected"]
    assert all(c.summary.n == 1 for c in t.cells.values())  # two inits are never averaged as seeds
    assert t.cells[("SVD LoRA-FA corrected", "glue/mrpc")].summary.mean == pytest.approx(80.0)
    assert ("SVD LoRA-FA (r=2)", "glue/rte") not in t.cells
    md = to_markdown(report)
    assert "| mrpc |" not in md and "| rte |" not in md and "n=2" not in md


def test_recorded_fields_win_over_the_configuration(tmp_path):
    # newer records: run_info.seed / task / method_parts are what counts
    rec = make_record("lora", "mrpc", seed=0, run_info={"seed": 3, "task": "glue/mrpc",
                                                        "method_parts": {"layer": "lora", "init": "pissa", "optimizer": "lorafa"}})
    write(tmp_path, "a.json", rec)
    (run,) = build_report([tmp_path]).used
    assert (run.seed, run.label) == (3, "PiSSA + LoRA-FA")


def test_recorded_headline_is_the_column_an_sft_run_is_shown_by(tmp_path):
    """An SFT run's flat eval holds several evaluations; the headline its task recorded
    (meta_info.dataset.headline) picks the cell, not the first key, in tables and figures."""
    from loralab.report.plots import colours, efficiency_svg
    from loralab.report.tables import runs_headline

    metrics = {"boolq/accuracy": 0.61, "boolq/n": 3270.0, "piqa/accuracy": 0.72, "piqa/n": 1838.0}
    for seed, piqa in ((0, 0.72), (1, 0.74)):
        rec = make_record("lora", "mrpc", name="cs/lora", seed=seed, metrics={**metrics, "piqa/accuracy": piqa},
                          params={"task": "commonsense170k"})
        rec["meta_info"]["dataset"]["headline"] = "piqa/accuracy"
        write(tmp_path, f"s{seed}.json", rec)
    old = make_record("lora", "mrpc", name="cs-old/lora", metrics=metrics, params={"task": "commonsense170k"})
    write(tmp_path, "old.json", old)  # written before runs recorded a headline: the first metric, as before
    report = build_report([tmp_path])
    # the task-column tables (each set also gets a table by evaluation: boolq and piqa are both accuracy)
    by_set = {t.split["set"]: t for t in report.tables if t.col_field == "task"}
    cell = by_set["cs"].cells[("LoRA", "commonsense170k")]
    assert cell.metric == "piqa/accuracy" and cell.values == pytest.approx([72.0, 74.0])
    assert by_set["cs-old"].cells[("LoRA", "commonsense170k")].metric == "boolq/accuracy"
    new_runs = [r for r in report.used if r.experiment_set == "cs"]
    assert runs_headline("commonsense170k", new_runs) == "piqa/accuracy"
    svg = efficiency_svg(new_runs, ["commonsense170k"], colours(["LoRA"]))
    assert "piqa/accuracy" in svg and "boolq/accuracy" not in svg  # the axis label names the headline
    # a GLUE record written now names its first metric, the one the convention picks for old records
    bad = make_record("lora", "mrpc", name="bad/lora")
    bad["meta_info"]["dataset"]["headline"] = 3
    write(tmp_path / "bad", "bad.json", bad)
    assert "headline" in build_report([tmp_path / "bad"]).problems[0].reason


def test_quickstart_run_gets_its_own_table_not_a_row(tmp_path):
    quick = make_record("lora", "mrpc", name="quickstart/lora-minilm-sst2", metrics={"accuracy": 0.827},
                        params={"task": "glue/sst2", "max_train_samples": 2000, "learning_rate": 5e-4})
    write(tmp_path / "quick", "quickstart.json", quick)
    report = build_report([GLUE_MINILM, tmp_path / "quick"])
    by_set = {t.split["set"]: t for t in report.tables}
    assert set(by_set) == {"glue-minilm", "quickstart"}
    assert by_set["glue-minilm"].rows == ["Full FT", "LoRA", "DoRA", "PiSSA", "CorDA (IPA)"]
    assert by_set["quickstart"].cols == ["glue/sst2"]


def test_shipped_glue_minilm_table_matches_the_readme():
    report = build_report([GLUE_MINILM])
    (t,) = report.tables
    assert [c for c in t.cols] == ["glue/mrpc", "glue/rte", "glue/stsb"]
    means = {row: [round(t.cells[(row, c)].summary.mean, 2) for c in t.cols] + [round(t.avg[row].mean, 2)] for row in t.rows}
    assert means["Full FT"] == [76.96, 55.60, 84.03, 72.19]
    assert means["CorDA (IPA)"] == [81.62, 54.87, 86.10, 74.20]
    assert t.params["LoRA"] == "5.46M" and t.params["Full FT"] == "22.7M"
    assert ("CorDA (IPA)", "avg") in t.best and ("PiSSA", "glue/rte") in t.best


def test_seeds_pooled_with_interval_few_seeds_marked_and_comparison(tmp_path):
    for seed, (lora, pissa) in enumerate([(0.70, 0.75), (0.72, 0.78), (0.74, None)]):
        write(tmp_path, f"lora-{seed}.json", make_record("lora", "mrpc", name="set/lora/mrpc", seed=seed,
                                                          metrics={"accuracy": lora}))
        if pissa is not None:
            write(tmp_path, f"pissa-{seed}.json", make_record("pissa", "mrpc", name="set/pissa/mrpc", seed=seed,
                                                               metrics={"accuracy": pissa}))
    report = build_report([tmp_path])
    (t,) = report.tables
    lora = t.cells[("LoRA", "glue/mrpc")]
    assert lora.values == pytest.approx([70, 72, 74]) and [r.seed for r in lora.runs] == [0, 1, 2]
    md = to_markdown(report)
    assert "| LoRA | 5.46M | 72.00 ± 2.00 [70.00, 74.00] (n=3) |" in md  # hand: sd of 70, 72, 74 is 2
    # PiSSA: 75, 78; a resample of two is all-75 with probability 1/4, so the interval is [75, 78]; bold: best
    assert "| PiSSA | 5.46M | **76.50** ± 2.12 [75.00, 78.00] (n=2)† |" in md
    (cmp,) = t.comparisons  # PiSSA − LoRA on the two shared seeds: +5, +6
    assert (cmp.a, cmp.b, cmp.n, cmp.wins) == ("PiSSA", "LoRA", 2, 2) and cmp.mean_diff == pytest.approx(5.5)
    assert cmp.p == pytest.approx(0.5)


def test_rows_other_than_methods_pool_runs_and_say_so():
    report = build_report([GLUE_MINILM], by="init,task")
    (t,) = report.tables
    assert t.rows == ["corda", "default", "pissa"] and t.pooled and not t.comparisons
    # "default" pools Full FT, LoRA and DoRA on MRPC: 76.96, 70.83, 70.83 -> mean 72.88, n=3 runs
    assert t.cells[("default", "glue/mrpc")].summary.mean == pytest.approx((76.96 + 70.83 + 70.83) / 3, abs=0.01)
    md = to_markdown(report)
    assert "(n runs)" in md and "(mean of cells)" in md


def test_rerun_of_the_same_seed_supersedes_the_older_file(tmp_path):
    write(tmp_path, "old.json", make_record(name="s/lora/mrpc", metrics={"accuracy": 0.5}, stamp="2026-01-01T00:00:00+00:00"))
    write(tmp_path, "new.json", make_record(name="s/lora/mrpc", metrics={"accuracy": 0.6}, stamp="2026-02-01T00:00:00+00:00"))
    report = build_report([tmp_path])
    assert [r.source.name for r in report.used] == ["new.json"]
    assert [(o.source.name, n.source.name) for o, n in report.superseded] == [("old.json", "new.json")]
    assert "superseded" in to_markdown(report)


# --- files the report cannot use, runs that did not finish --------------------------------------

def test_corrupt_and_invalid_files_are_named_and_the_report_goes_on(tmp_path, capsys):
    write(tmp_path, "good.json", make_record())
    text = json.dumps(make_record())
    write(tmp_path, "truncated.json", text[: len(text) // 2])
    write(tmp_path, "bad-status.json", make_record(train_info={"status": "exploded"}))
    write(tmp_path, "string-metric.json", make_record(metrics={"accuracy": "0.7"}))
    write(tmp_path, "not-a-record.json", {"gsm8k": {"accuracy": 0.0}})
    assert main(["report", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "| LoRA | 5.46M | 70.83 (n=1)† |" in out
    assert "truncated.json: not valid JSON" in err
    assert "bad-status.json: invalid result record: train_info.status = 'exploded'" in err
    assert "string-metric.json: invalid result record: eval.accuracy = '0.7' is not a number" in err
    assert "not-a-record.json" not in err and "Traceback" not in err
    assert "truncated.json" in out  # the markdown lists it too


def test_failed_cancelled_and_diverged_runs_are_listed_apart(tmp_path):
    write(tmp_path, "ok.json", make_record(name="s/lora/mrpc"))
    write(tmp_path, "failed.json", make_record(name="s/lora/mrpc", seed=1, status="failed", train_info={
        "error": {"type": "RuntimeError", "message": "CUDA out of memory", "traceback": "Traceback ...", "phase": "train"}}))
    write(tmp_path, "cancelled.json", make_record(name="s/lora/mrpc", seed=2, status="cancelled"))
    write(tmp_path, "diverged.json", make_record("pissa", name="s/pissa/mrpc", status="diverged"))
    report = build_report([tmp_path])
    (t,) = report.tables
    assert t.rows == ["LoRA"] and t.cells[("LoRA", "glue/mrpc")].excluded == {"failed": 1, "cancelled": 1}
    assert sorted(r.status for r in report.not_success) == ["cancelled", "diverged", "failed"]
    md = to_markdown(report)
    assert "70.83 (n=1)† (+1 cancelled, 1 failed)" in md
    assert "| failed | s/lora/mrpc | 1 | train | RuntimeError: CUDA out of memory |" in md


def test_a_run_resumed_to_its_end_is_not_listed_as_unfinished(tmp_path):
    """An interrupted run (its record: cancelled, naming its checkpoint) that ``--resume`` finished (the success
    record names that checkpoint as ``resumed_from``) is one finished run: the cancelled record is left out with
    the reason, not counted beside the cell; another cancelled run (its own folder) is still listed."""
    folder = "/out/s--lora--mrpc--2026-11-22T23-00-00Z"
    write(tmp_path, "cancelled.json", make_record(name="s/lora/mrpc", status="cancelled", stamp="2026-11-22T23:00:00+00:00",
                                                  train_info={"checkpoint": f"{folder}/checkpoints/step-28"}))
    write(tmp_path, "resumed.json", make_record(name="s/lora/mrpc", stamp="2026-11-22T23:30:00+00:00", train_info={
        "resumed_from": f"{folder}/checkpoints/step-28", "checkpoint": f"{folder}/checkpoints/step-63"}))
    other = "/out/s--lora--mrpc--2026-11-24T10-00-00Z/checkpoints"
    write(tmp_path, "other.json", make_record(name="s/lora/mrpc", seed=5, status="cancelled", stamp="2026-11-24T10:00:00+00:00",
                                              train_info={"checkpoint": f"{other}/step-3"}))
    write(tmp_path, "other-again.json", make_record(name="s/lora/mrpc", seed=5, status="failed", stamp="2026-11-24T11:00:00+00:00",
                                                    train_info={"checkpoint": f"{other}/step-9", "resumed_from": f"{other}/step-3"}))
    write(tmp_path, "odd.json", make_record(name="s/lora/mrpc", seed=6, status="cancelled", train_info={"checkpoint": "step-3"}))
    report = build_report([tmp_path])
    (t,) = report.tables
    # the other run, stopped twice, once (its newest record); a record whose checkpoint names no folder stands alone
    assert t.cells[("LoRA", "glue/mrpc")].excluded == {"failed": 1, "cancelled": 1}
    assert sorted(r.source.name for r in report.not_success) == ["odd.json", "other-again.json"]
    assert sorted((o.source.name, n.source.name) for o, n in report.superseded) == [
        ("cancelled.json", "resumed.json"), ("other.json", "other-again.json")]
    md = to_markdown(report)
    assert "cancelled.json (2026-11-22T23:00:00+00:00): cancelled, then resumed to its end by --resume: " in md
    assert "other.json (2026-11-24T10:00:00+00:00): cancelled, then resumed by --resume and failed again: " in md


# --- formats and options -------------------------------------------------------------------------

def test_json_and_csv_hold_every_cell(tmp_path, capsys):
    assert main(["report", str(GLUE_MINILM), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (t,) = data["tables"]
    assert len(t["cells"]) == 15 and t["scale"] == 100
    cell = next(c for c in t["cells"] if c["row"] == "LoRA" and c["column"] == "glue/stsb")
    assert cell["metric"] == "pearson" and cell["n"] == 1 and cell["fewer_than_min_seeds"]
    assert main(["report", str(GLUE_MINILM), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 15 and {r["metric"] for r in rows} == {"accuracy", "pearson"}


def test_metric_option_and_out_folder(tmp_path, capsys):
    assert main(["report", str(GLUE_MINILM), "--metric", "glue/mrpc=f1", "--format", "md", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "MRPC f1" in md and "81.78 (n=1)†" in md  # LoRA's recorded MRPC F1 0.81776
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("argv, message", [
    (["--by", "method,colour"], "--by 'method,colour': expected ROWS,COLUMNS, two different fields of method, task"),
    (["--compare", "LoRA,VeRA"], "--compare 'LoRA,VeRA': no table has both rows"),
    (["--metric", "=f1"], "expected NAME or TASK=NAME"),
])
def test_bad_options_exit_2_naming_the_value(argv, message, capsys):
    assert main(["report", str(GLUE_MINILM), *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_path_and_empty_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "no result records found" in capsys.readouterr().err


def test_top_level_help_reads_as_user_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "Train, evaluate and compare low-rank adaptation methods" in out and "examples:" in out
    for command in ("run", "report", "methods", "tasks", "eval", "merge", "decompose", "bench"):
        assert f"    {command}" in out
    assert "``" not in out


# --- plots and page without a browser ------------------------------------------------------------

def test_curves_draw_evaluations_during_training_and_bands_over_seeds(tmp_path):
    from loralab.report.plots import colours, curves_svg, series

    for seed in (0, 1):
        rec = make_record("lora", "mrpc", name="s/lora/mrpc", seed=seed)
        history = rec["train_info"]["metrics"]
        history[9]["eval accuracy"] = 0.60 + 0.1 * seed  # step 100, as eval_steps writes it
        write(tmp_path, f"s{seed}.json", rec)
    runs = build_report([tmp_path]).used
    steps, mean, sd, n = series(runs, "eval accuracy", 100.0)
    assert steps.tolist() == [100.0] and n.tolist() == [2]
    assert mean == pytest.approx([65.0]) and sd == pytest.approx([np.sqrt(50)])  # 60 and 70: sd sqrt(50)
    svg, drawn = curves_svg(runs, "glue/mrpc", colours(["LoRA"]))
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    assert drawn == ["LoRA: train loss", "LoRA: final accuracy", "LoRA: eval accuracy", "LoRA: lr"]


def test_html_page_escapes_recorded_text(tmp_path):
    from loralab.report.html import to_html

    write(tmp_path, "ok.json", make_record(name="s/lora/mrpc"))
    write(tmp_path, "failed.json", make_record(name="s/lora/mrpc", seed=1, status="failed", train_info={
        "error": {"type": "ValueError", "message": "<script>alert(1)</script>", "phase": "build"}}))
    page = to_html(build_report([tmp_path]))
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # the page's own load check only


def test_cost_table_pools_a_rows_runs_init_seconds_and_peaks(tmp_path):
    costs = [(2.0, 100 * 2**20, 10.0, 2**30), (4.0, 300 * 2**20, 20.0, 3 * 2**30), (3.0, 200 * 2**20, 30.0, 2 * 2**30)]
    for seed, (secs, init_peak, train_s, peak) in enumerate(costs):
        write(tmp_path, f"pissa-{seed}.json", make_record(
            "pissa", "mrpc", name="set/pissa/mrpc", seed=seed, metrics={"accuracy": 0.7},
            run_info={"init_cost": {"seconds": secs, "device": "cuda", "peak_memory_bytes": init_peak}},
            train_info={"train_time": train_s, "cuda_memory_max": peak}))
    write(tmp_path, "lora.json", make_record("lora", "mrpc", name="set/lora/mrpc", seed=0, metrics={"accuracy": 0.7},
                                             run_info={"init_cost": None}))
    md = to_markdown(build_report([tmp_path]))
    # hand: init mean (2+4+3)/3 = 3, largest init peak 300 MiB; train mean 20 over [10, 30]; largest peak 3 GiB
    assert "| set | PiSSA | 3 | 3.00 [2.00, 4.00] | 0.29 GiB | 20.00 [10.00, 30.00] | 3.00 GiB |" in md
    assert "| set | LoRA | 1 | – | – |" in md  # a record without init_cost (older files) shows none


def test_a_run_from_a_saved_decomposition_costs_the_decomposition_too(tmp_path):
    """init_adapter on a decompose --save-path folder only loads the adapter (0.5 s); the decomposition that made it
    took 40 s (decompose.json, carried in run_info.init_adapter): the cost table counts both, as for a run that
    calibrated in-process."""
    write(tmp_path, "corda.json", make_record(
        "corda", "mrpc", name="set/corda/mrpc", seed=0, metrics={"accuracy": 0.7},
        run_info={"init_cost": {"seconds": 0.5, "device": "cpu"},
                  "init_adapter": {"path": "/d/adapter", "decomposition": {"r": 8, "mode": "ipa", "seconds": 40.0}}},
        train_info={"train_time": 10.0}))
    md = to_markdown(build_report([tmp_path]))
    assert "| 40.50 [40.50, 40.50] |" in md
    (run,) = build_report([tmp_path]).runs
    assert run.init_cost["decomposition_seconds"] == 40.0


def test_compare_rows_whose_labels_hold_commas(tmp_path):
    for task, init, r, lr, acc in [("mrpc", "svd_lorafa", 4, 4e-4, 0.70), ("mrpc", "svd_lorafa", 2, 1e-4, 0.66),
                                   ("rte", "svd_lorafa", 4, 4e-4, 0.55), ("rte", "svd_lorafa", 2, 1e-4, 0.52)]:
        rec = make_record("lora", task, name=f"lorafa/{task}/{init}-r{r}-lr{lr:g}", metrics={"accuracy": acc},
                          params={"init": init, "optimizer": "lorafa", "learning_rate": lr}, adapter={"r": r})
        rec["run_info"]["method"] = "svd_lorafa"
        write(tmp_path, f"{task}-{r}.json", rec)
    report = build_report([tmp_path], compare=["SVD LoRA-FA (lr=0.0004, r=4),SVD LoRA-FA (lr=0.0001, r=2)"])
    (t,) = report.tables
    (cmp,) = t.comparisons  # hand: (70 − 66 + 55 − 52) / 2 = 3.5 over the two tasks
    assert (cmp.a, cmp.b, cmp.n, cmp.wins) == ("SVD LoRA-FA (lr=0.0004, r=4)", "SVD LoRA-FA (lr=0.0001, r=2)", 2, 2)
    assert cmp.mean_diff == pytest.approx(3.5)


def test_a_table_scored_off_the_dev_split_says_so(tmp_path):
    write(tmp_path, "sweep.json", make_record("lora", "mrpc", name="sweep/lora/mrpc", seed=0, metrics={"accuracy": 0.7},
                                              params={"eval_split": "holdout", "holdout_fraction": 0.1}))
    (t,) = build_report([tmp_path]).tables
    assert t.title.endswith("scored on the held-out part of train (eval_split holdout)")
    (t,) = build_report([GLUE_MINILM]).tables
    assert "scored on" not in t.title  # dev, the default, goes unsaid


@pytest.mark.slow
def test_known_library_noise_is_filtered(tmp_path):
    """bitsandbytes warns on every import of peft (on CPUs with AVX512-BF16) that an optional kernel
    package is missing; `loralab` says so once in the README instead of on every run."""
    import subprocess
    import sys

    # both at once: each is a single-threaded interpreter start and import of peft (~6 s), one per core
    started = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for cmd in ([sys.executable, "-c", "import peft, bitsandbytes"], [sys.executable, "-m", "loralab", "methods"])]
    (_, plain_err), (_, ours_err) = (proc.communicate(timeout=300) for proc in started)
    assert started[1].returncode == 0, ours_err
    if "gemm_4bit_forward" in plain_err:  # this CPU triggers it: loralab must not print it
        assert "gemm_4bit_forward" not in ours_err


def test_terminal_lists_five_superseded_runs_and_counts_the_rest():
    """A report over many re-runs names five superseded files on the terminal and counts the rest;
    the Markdown report lists them all."""
    from types import SimpleNamespace

    from loralab.report.render import problem_lines

    runs = [(SimpleNamespace(source=f"old{i}.json", created_at="t", status="success"), SimpleNamespace(source=f"new{i}.json"))
            for i in range(8)]
    report = SimpleNamespace(unreadable=[], superseded=runs, problems=[])
    lines = problem_lines(report)
    assert [line.startswith("superseded old") for line in lines] == [True] * 5 + [False]
    assert "3 more superseded runs" in lines[-1]
    assert sum(line.startswith("- superseded old") for line in problem_lines(report, markdown=True)) == 8


def test_generation_settings_do_not_split_classification_seeds(tmp_path):
    """GLUE runs that differ only in keys steering generative evaluation (no text is generated for
    classification) are seeds of one row, not variants; a learning rate still splits them."""
    write(tmp_path, "a.json", make_record(seed=0, params={"generation": {"max_new_tokens": 512}, "eval_tasks": []}))
    write(tmp_path, "b.json", make_record(seed=1, params={"generation": {"max_new_tokens": None}, "eval_tasks": None},
                                          stamp="2026-11-22T23:01:00+00:00"))
    (t,) = build_report([tmp_path]).tables
    assert t.rows == ["LoRA"] and next(iter(t.cells.values())).summary.n == 2
    write(tmp_path, "c.json", make_record(seed=2, params={"learning_rate": 1e-3}, stamp="2026-11-22T23:02:00+00:00"))
    (t,) = build_report([tmp_path]).tables
    assert len(t.rows) == 2


def test_peft_versions_own_head_names_do_not_split_a_variant(tmp_path):
    """peft adds its classification-head names to ``modules_to_save`` itself (0.21: "classifier", "score", appended
    even where present; 0.22 also "pre_classifier"): the same experiment recorded under both versions is one variant
    (seeds of one label), while a module the experiment itself saves still names a variant."""
    from loralab.report.records import load_runs

    peft_021 = ["classifier", "pooler", "classifier", "score"]
    peft_022 = ["classifier", "pooler", "pre_classifier", "score"]
    for i, (saved, seed) in enumerate(((peft_021, 1), (peft_022, 2), (["classifier", "score"], 3))):
        write(tmp_path, f"r{i}.json", make_record(seed=seed, adapter={"modules_to_save": saved, "task_type": "SEQ_CLS"}))
    runs, problems = load_runs([tmp_path])
    assert not problems
    labels = {r.config["training_parameters"]["seed"]: r.label for r in runs}
    assert labels[1] == labels[2] and "pre_classifier" not in labels[1] and "score" not in labels[1]
    assert labels[3] != labels[1] and "modules_to_save" in labels[3]  # without the pooler: another variant
