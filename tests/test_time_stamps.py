"""Time stamps a user reads (issue 24.6): a record's ``created_at`` is ISO 8601 UTC with ``Z``, and
result files and run output folders end in ``2026-12-04T22-05-21Z``, never in ``-00-00`` (the
sanitised ``+00:00`` offset, which read like part of the time)."""

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from report_records import make_record, write

from loralab import results
from loralab.report.build import build_report
from loralab.run import output_dir

ROOT = Path(__file__).resolve().parents[1]
NAME_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ")


def real_record() -> dict:
    path = next(p for p in sorted((ROOT / "results" / "glue-minilm-seeds").glob("*.json")) if "--stsb--" in p.name)
    return json.loads(path.read_text())


def test_now_iso_is_iso_8601_utc_with_z():
    now = results.now_iso()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", now)
    when = datetime.fromisoformat(now)
    assert when.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 5


@pytest.mark.parametrize("created_at", ["2026-12-04T22:05:21Z", "2026-12-04T22:05:21+00:00", "2026-12-04T23:05:21+01:00"])
def test_stamp_names_the_utc_time_unambiguously(created_at):
    assert results.stamp(created_at) == "2026-12-04T22-05-21Z"


@pytest.mark.parametrize("created_at", ["2026-12-04T22:05:21", "yesterday"])
def test_stamp_refuses_a_time_without_offset(created_at):
    with pytest.raises(ValueError):
        results.stamp(created_at)


def test_result_file_name_ends_in_the_utc_stamp(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_RESULTS_DIR", str(tmp_path))
    record = real_record()
    record["run_info"]["created_at"] = results.now_iso()
    assert results.validate(record) == []
    path = results.write_result(record, {"branch": "main", "dirty": False})
    assert path.name.endswith(f"--{results.stamp(record['run_info']['created_at'])}.json")
    assert NAME_STAMP.search(path.name) and "-00-00" not in path.name
    old = real_record()  # records written before the change (+00:00) name their files the same way
    assert old["run_info"]["created_at"].endswith("+00:00")
    assert NAME_STAMP.search(results.write_result(old, {"branch": "main", "dirty": False}).name)


def test_a_created_at_that_is_not_a_time_is_not_written(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_RESULTS_DIR", str(tmp_path))
    record = real_record()
    record["run_info"]["created_at"] = "2026-12-04 late evening"
    with pytest.raises(results.InvalidRecord, match="run_info.created_at"):
        results.write_result(record, {"branch": "main", "dirty": False})
    assert not list(tmp_path.rglob("*.json"))


def test_run_output_folder_ends_in_the_utc_stamp(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_OUTPUT_DIR", str(tmp_path))
    created_at = results.now_iso()
    folder = output_dir(SimpleNamespace(name="quickstart/lora-minilm-sst2"), created_at)
    assert folder.name == f"quickstart--lora-minilm-sst2--{results.stamp(created_at)}"


def test_report_reads_both_stamps_and_orders_runs_by_time(tmp_path):
    # the same run twice: an older record with +00:00, a newer one with Z (and one with another offset)
    write(tmp_path, "a.json", make_record(seed=0, stamp="2026-11-22T23:00:00+00:00", metrics={"accuracy": 0.5}))
    write(tmp_path, "b.json", make_record(seed=0, stamp="2026-11-22T23:30:00Z", metrics={"accuracy": 0.6}))
    write(tmp_path, "c.json", make_record(seed=0, stamp="2026-11-23T00:10:00+01:00", metrics={"accuracy": 0.7}))
    report = build_report([tmp_path])
    assert not report.problems
    assert [r.metrics["accuracy"] for r in report.used] == [0.6]  # 23:30Z is the newest; c.json is 23:10Z
    assert {str(old.source.name) for old, _ in report.superseded} == {"a.json", "c.json"}
