"""The HTML report in a real browser: headless Chromium (Debian's ``chromium`` package; .ci/run
installs it) loads the page from disk with no network, every table and every plot must have
rendered, and a screenshot is saved (``$LORALAB_SCREENSHOT_DIR`` or the test's tmp folder)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from report_records import GLUE_MINILM, make_record, write

from loralab.cli import main

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium); CI installs it")


def _chromium(*args, timeout=120) -> subprocess.CompletedProcess:
    # --no-sandbox: CI and this machine run as root, where Chromium's sandbox refuses to start
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


@pytest.mark.slow
def test_html_report_renders_every_table_and_plot(tmp_path):
    failed = make_record(name="glue-minilm/lora/rte", seed=1, status="failed", params={"task": "glue/rte"}, train_info={
        "error": {"type": "RuntimeError", "message": "CUDA out of memory", "traceback": "Traceback (most recent call last) ...",
                  "phase": "train"}})
    extra = tmp_path / "extra"
    write(extra, "failed.json", failed)
    write(extra, "corrupt.json", '{"run_info": {')
    out = tmp_path / "report"
    assert main(["report", str(GLUE_MINILM), str(extra), "--format", "html", "--out", str(out)]) == 0
    page = out / "report.html"
    html = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)  # self-contained: nothing fetched

    dom = _chromium("--dump-dom", page.as_uri()).stdout
    assert 'data-loaded="yes"' in dom  # the page's load handler ran
    tables = re.findall(r'<table class="results" data-rows="(\d+)" data-columns="(\d+)">(.*?)</table>', dom, re.DOTALL)
    assert [(r, c) for r, c, _ in tables] == [("5", "3")]
    body = tables[0][2]
    assert body.count("<tr>") == 1 + 5 and "<b>81.62</b>" in body  # header + one row per method; best in bold
    kinds = sorted(re.findall(r'<figure class="plot" data-plot="([^"]+)"><img ', dom))
    assert kinds == ["curves glue-minilm glue/mrpc", "curves glue-minilm glue/rte", "curves glue-minilm glue/stsb",
                     "efficiency glue-minilm"]
    assert dom.count('data-rendered="yes"') == 4 and 'data-rendered="no"' not in dom  # every image decoded
    assert 'class="comparison"' in dom and 'class="not-finished"' in dom and "CUDA out of memory" in dom
    assert "corrupt.json" in dom and dom.count('<details class="run">') == 16  # 15 runs + the failed one

    shots = Path(os.environ.get("LORALAB_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "report.png"
    _chromium("--window-size=1280,3000", f"--screenshot={shot}", page.as_uri())
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (3000, 1280)
    colours = {tuple(p) for p in (pixels[::7, ::7, :3] * 255).astype(int).reshape(-1, 3)}
    assert len(colours) > 50  # tables and coloured plot lines, not a blank or error page
