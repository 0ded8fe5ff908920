"""The result record and where it goes (seed 004): ``results/`` for a main run (branch main, clean
tree, success), ``temporary_results/`` otherwise (failed and diverged runs included),
``cancelled_results/`` after SIGINT/SIGTERM. Records are validated, then written atomically
(temporary file + rename).
``$LORALAB_RESULTS_DIR`` replaces the root folder (default: the current directory).
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REQUIRED = {
    "run_info": ("created_at", "total_time", "experiment_name", "git", "train_params_sha", "peft_config_sha", "config"),
    "train_info": ("status", "train_time", "trainable_params", "file_size", "metrics"),
    "eval": (),
    "meta_info": ("model", "dataset", "package_info", "system_info"),
}
STATUSES = ("success", "failed", "cancelled", "diverged")
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "loralab")


def git_state(where: Path) -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
    except (FileNotFoundError, subprocess.TimeoutExpired):
        head = None
    if head is None or head.returncode != 0:
        # a copy of the tree without .git (e.g. a GPU box): the launcher may state the commit it sent
        if os.environ.get("LORALAB_GIT_COMMIT"):
            return {
                "commit": os.environ["LORALAB_GIT_COMMIT"],
                "branch": os.environ.get("LORALAB_GIT_BRANCH"),
                "dirty": os.environ.get("LORALAB_GIT_DIRTY", "1") != "0",
                "source": "environment",
            }
        return {"commit": None, "branch": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    branch = git("rev-parse", "--abbrev-ref", "HEAD").stdout.strip()
    return {"commit": head.stdout.strip(), "branch": branch, "dirty": bool(status.stdout.strip())}


def results_root() -> Path:
    return Path(os.environ.get("LORALAB_RESULTS_DIR", "."))


def route(status: str, git: dict) -> Path:
    if status == "cancelled":
        folder = "cancelled_results"
    elif status == "success" and git.get("branch") == "main" and git.get("dirty") is False:
        folder = "results"
    else:
        folder = "temporary_results"
    return results_root() / folder


def package_info() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def system_info() -> dict:
    import torch

    info = {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if os.environ.get("LORALAB_RUNS_PER_GPU"):  # set by a sweep with --runs-per-gpu: timings were shared
        info["runs_per_gpu"] = int(os.environ["LORALAB_RUNS_PER_GPU"])
    return info


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def validate(record: dict) -> list[str]:
    """Missing sections/keys of a result record (used by tests and before writing)."""
    problems = []
    for section, keys in REQUIRED.items():
        if section not in record:
            problems.append(f"missing section {section}")
            continue
        for key in keys:
            if key not in record[section]:
                problems.append(f"missing {section}.{key}")
    if "eval" in record and not all(isinstance(v, (int, float)) for v in record["eval"].values()):
        problems.append("eval must map names to numbers")
    status = record.get("train_info", {}).get("status")
    if status not in STATUSES:
        problems.append(f"train_info.status = {status!r}; allowed: {', '.join(STATUSES)}")
    if status in ("failed", "diverged"):
        error = record["train_info"].get("error") or {}
        for key in ("type", "message", "phase"):
            if key not in error:
                problems.append(f"a {status} record needs train_info.error.{key}")
    return problems


def write_result(record: dict, git: dict) -> Path:
    """Validate ``record`` and write it atomically where its status and git state route it.
    Raises ValueError naming what is missing (a bug: the runner builds the record)."""
    problems = validate(record)
    if problems:
        raise ValueError("result record is invalid: " + "; ".join(problems))
    status = record["train_info"]["status"]
    folder = route(status, git)
    folder.mkdir(parents=True, exist_ok=True)
    stem = record["run_info"]["experiment_name"].replace("/", "--")
    stamp = re.sub(r"[^0-9A-Za-z_.-]", "-", record["run_info"]["created_at"])
    path = folder / f"{stem}--{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(record, indent=2, default=str))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
