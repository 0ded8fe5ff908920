"""``loralab eval`` under ``torchrun`` on CPU (2 gloo processes): each rank generates its share of
the prompts on loralab's engine, and rank 0 writes the same greedy completions and metrics as one
process, with every rank's engine counters (issue 23's data-parallel evaluation, on real SmolLM2
weights cut to 2 layers (conftest's ``smollm2_cut_path``: the split does not depend on depth) and real
GSM8K problems)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ARGS = ["eval", "--tasks", "gsm8k", "--max-samples", "5", "--max-new-tokens", "8", "--device", "cpu"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_evaluate_like_one(tmp_path, data_dir, smollm2_cut_path, monkeypatch):
    monkeypatch.setenv("LORALAB_DATA_DIR", str(data_dir))
    args = [*ARGS, "--model", smollm2_cut_path]
    assert main([*args, "--output", str(tmp_path / "one.json"), "--generations-out", str(tmp_path / "one.jsonl")]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "LORALAB_DATA_DIR": str(data_dir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "loralab", *args,
           "--output", str(tmp_path / "two.json"), "--generations-out", str(tmp_path / "two.jsonl")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count('"meta_info"') == 1  # rank 0 alone prints the metrics (one document)
    one, two = _lines(tmp_path / "one.jsonl"), _lines(tmp_path / "two.jsonl")
    assert [r["id"] for r in two] == [r["id"] for r in one] and len(one) == 5  # every problem once, in order
    assert [r["completion"] for r in two] == [r["completion"] for r in one]  # greedy: the same completions
    m1, m2 = (json.loads((tmp_path / f"{n}.json").read_text())["gsm8k"] for n in ("one", "two"))
    assert m2["accuracy"] == m1["accuracy"] and m2["n"] == m1["n"] == 5
    split = m2["engine_ranks"]
    assert split["world_size"] == len(split["per_rank"]) == 2 and "engine_ranks" not in m1  # one process: its own
    assert split["new_tokens"] == sum(r["new_tokens"] for r in split["per_rank"]) == m1["engine"]["new_tokens"]
    assert all(r["new_tokens"] > 0 for r in split["per_rank"])  # both ranks generated
    assert [r["problems"] for r in split["per_rank"]] == [3, 2] and m1["engine"]["problems"] == 5  # prompt i: rank i mod 2
    assert "engine" not in m2  # no rank's counters passed off as the whole run's
    assert {k: v for k, v in m2.items() if isinstance(v, (int, float))} == \
        {k: v for k, v in m1.items() if isinstance(v, (int, float))}  # the scores a record keeps: the same
