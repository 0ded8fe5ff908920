"""Result records for the report tests, made from the real MiniLM GLUE result files in
results/glue-minilm (seed 000's recipe, H100): a test copies one and changes only the recorded
fields its case is about (experiment name, seed, init, status, final metric)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLUE_MINILM = REPO / "results" / "glue-minilm"


def real_record(method: str = "lora", task: str = "mrpc") -> dict:
    (path,) = GLUE_MINILM.glob(f"glue-minilm--{method}--{task}--*.json")
    return json.loads(path.read_text())


def make_record(method="lora", task="mrpc", *, name=None, seed=None, metrics=None, status=None, stamp="2026-11-22T23:00:00+00:00",
                params=None, adapter=None, run_info=None, train_info=None) -> dict:
    """A real record with these recorded fields replaced (``params``/``adapter`` update the
    training parameters / adapter config key by key)."""
    rec = copy.deepcopy(real_record(method, task))
    ri, ti = rec["run_info"], rec["train_info"]
    tp = ri["config"]["training_parameters"]
    if name is not None:
        ri["experiment_name"] = name
    if seed is not None:
        tp["seed"] = seed
    if metrics is not None:
        rec["eval"] = dict(metrics)
    ri["created_at"] = stamp
    tp.update(params or {})
    if adapter:
        ri["config"]["adapter_config"].update(adapter)
    ri.update(run_info or {})
    ti.update(train_info or {})
    if status is not None:
        ti["status"] = status
        if status != "success":
            rec["eval"] = {}
    return rec


def write(folder: Path, filename: str, record) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(record if isinstance(record, str) else json.dumps(record, indent=1))
    return path
