"""scripts/gpu_fair_bench.sh's last part, ``bundle``, on CPU: a device call returns at most 8 files, so every file a
call makes must be inside the one archive, the printed tables among them (they once came back empty: printed after
the archive had emptied $OUT, results/bench-fair-h100-1207f)."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the table script imports torch
def test_bundle_archives_the_tables_it_prints(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(ROOT / "results" / "bench-fair-h100-1207f" / "fair8b.json", out / "fair8b.json")
    work = tmp_path / "tree"  # the script runs from a tree's root: scripts/ and src/, without .whl to install
    work.mkdir()
    for name in ("scripts", "src"):
        (work / name).symlink_to(ROOT / name)
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "LORALAB_GIT_COMMIT": "test"}
    run = subprocess.run(["bash", "scripts/gpu_fair_bench.sh", "bundle"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    # beside the archive only the summary the script appends its total to after the last part
    assert sorted(p.name for p in out.iterdir()) == ["bundle.tgz", "summary.txt"]
    with tarfile.open(out / "bundle.tgz") as archive:
        names = {Path(n).name for n in archive.getnames()}
        tables = archive.extractfile("./tables.md").read().decode()
    assert {"fair8b.json", "gpu.txt", "tables.md"} <= names
    assert "| goal (issue 22) | measured | |" in tables and "| llama-3-8b/fixed-4x512 | lora | loralab |" in tables
    assert tables.strip() in run.stdout  # the call's own output shows the same tables
