"""The result record and where it goes (seed 004): ``results/`` for a main run (branch main, clean
tree, success), ``temporary_results/`` otherwise (failed and diverged runs included),
``cancelled_results/`` after SIGINT/SIGTERM. Records are validated, then written atomically
(temporary file + rename).
``$LORALAB_RESULTS_DIR`` replaces the root folder (default: the current directory).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
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


CODE_TREE = Path(__file__).resolve().parent  # the loralab package this process imported
GIVEN = ("LORALAB_GIT_COMMIT", "LORALAB_GIT_BRANCH", "LORALAB_GIT_DIRTY")
UNKNOWN = "unknown"


def git_state(where: Path | None = None, experiment: Path | None = None) -> dict:
    """Git commit, branch and dirty state of the tree the code runs from (``where``, default: the
    loralab package's own folder), measured with ``git``: ``"source": "measured"``.

    A tree without ``.git`` (a copy sent to a GPU machine) records ``"unknown"`` for all three,
    never ``false``. Only there may the launcher state them, each by its own variable
    (``LORALAB_GIT_COMMIT``, ``LORALAB_GIT_BRANCH``, ``LORALAB_GIT_DIRTY`` = 0/1), and the record names
    the variables it took (``"source": "given by LORALAB_GIT_COMMIT"``); what is not given stays
    unknown, so such a run goes to ``results/`` only when the launcher stated main and a clean tree.
    ``code_sha256`` (of the package's ``.py`` files) is always measured, so a given commit can be
    checked against the code that ran. A measured tree is dirty where a tracked file changed or a file
    under ``where`` is neither tracked nor ignored (listed as ``untracked``: a new module the code may
    import). With ``experiment`` (a folder) a measured state also says whether that folder is committed
    in the same tree with no untracked file in it (``experiment_committed``; such files are listed as
    ``experiment_untracked``): only then is a run a main run (``route``).
    """
    where = Path(where) if where is not None else CODE_TREE
    state = _measured(where)
    if state is not None and experiment is not None:
        folder = str(Path(experiment).resolve())
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", folder], cwd=where,
                                 capture_output=True, text=True, timeout=30)
        loose = _untracked(where, folder) if tracked.returncode == 0 else []
        state["experiment_committed"] = tracked.returncode == 0 and not loose
        if loose:
            state["experiment_untracked"] = loose
    if state is None:
        state = {"commit": UNKNOWN, "branch": UNKNOWN, "dirty": UNKNOWN,
                 "source": f"unknown: no git work tree at {where}"}
        given = [name for name in GIVEN if os.environ.get(name)]
        if given:
            state["source"] = "given by " + ", ".join(given)
            state["commit"] = os.environ.get("LORALAB_GIT_COMMIT") or UNKNOWN
            state["branch"] = os.environ.get("LORALAB_GIT_BRANCH") or UNKNOWN
            if os.environ.get("LORALAB_GIT_DIRTY"):
                state["dirty"] = os.environ["LORALAB_GIT_DIRTY"] != "0"
    state["code_sha256"] = code_sha256(CODE_TREE)
    return state


def _measured(where: Path) -> dict | None:
    """The git state of the work tree holding ``where``; None when there is none (or ``where`` is
    ignored by it, e.g. a package installed into a virtual environment inside a checkout)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0 or git("check-ignore", "-q", str(where)).returncode == 0:
            return None
        status = git("status", "--porcelain", "--untracked-files=no")
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        loose = _untracked(where, str(where.resolve()))
    except (FileNotFoundError, NotADirectoryError, subprocess.TimeoutExpired):
        return None
    if status.returncode != 0 or branch.returncode != 0 or loose is None:
        return None
    state = {"commit": head.stdout.strip(), "branch": branch.stdout.strip(),
             "dirty": bool(status.stdout.strip()) or bool(loose), "source": "measured"}
    if loose:
        state["untracked"] = loose
        state["tracked_changes"] = bool(status.stdout.strip())
    return state


UNTRACKED_LISTED = 10
"""How many untracked paths a record lists (``untracked``, ``experiment_untracked``); the rest are counted."""


def _untracked(where: Path, folder: str) -> list[str] | None:
    """Files under ``folder`` that git neither tracks nor ignores, as paths relative to the work tree's
    root (the first ``UNTRACKED_LISTED``, then "... and N more"); None when git cannot list them.
    A tracked change is dirt anywhere in the tree; an untracked file only under the code's own folder
    (a new module the code may import) or the experiment's (a new input file), so a record the
    quickstart writes into ``results/`` does not make the next run's tree dirty."""
    listed = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--full-name", "--", folder],
                            cwd=where, capture_output=True, text=True, timeout=30)
    if listed.returncode != 0:
        return None
    paths = listed.stdout.splitlines()
    more = len(paths) - UNTRACKED_LISTED
    return paths[:UNTRACKED_LISTED] + ([f"... and {more} more"] if more > 0 else [])


def code_sha256(root: Path) -> str:
    """sha256 over the ``.py`` files under ``root`` (relative path and bytes, sorted by path): the
    code that ran, measured whether or not the tree has ``.git``."""
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def sha256_file(path) -> str:
    """Hex sha256 of a data or model file's bytes, read in 1 MiB chunks (files may be large);
    raises OSError when the file cannot be read. Recorded as a dataset's ``sha256``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_sha256(files: list[Path], cache_dir: Path) -> str:
    """sha256 over each file's name and bytes, in order. Why cached: every run record and eval output hashes its
    local model folder, ~16 GB (8-16 s) for an 8B model at every ``loralab eval``; the digest is kept in
    ``cache_dir`` (``models.model_provenance``: ``<LORALAB_CACHE>/content-sha256``), keyed by each file's name (which
    the digest covers; a snapshot's links name shared blobs), absolute path (links resolved), size and mtime in ns (a
    rewritten file has a new mtime, so a new key: it is hashed again). A cache that
    cannot be written is skipped. Raises OSError where a file cannot be read."""
    stats = [(f.name, str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(repr(stats).encode()).hexdigest()
    entry = Path(cache_dir) / key
    try:
        return entry.read_text().strip()
    except OSError:
        pass
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest.hexdigest())
        os.replace(tmp, entry)
    except OSError:
        pass
    return digest.hexdigest()


def sha256_json(obj) -> str:
    """Hex sha256 of ``json.dumps(obj, sort_keys=True)``: the record's ``train_params_sha`` and
    ``peft_config_sha`` (key order does not change it; resume matches runs by it, so the
    serialisation must not change). Raises TypeError for values JSON cannot hold."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def results_root() -> Path:
    return Path(os.environ.get("LORALAB_RESULTS_DIR", "."))


def not_main_run(git: dict) -> str | None:
    """Why a run of this code is not a main run, in words (the first reason: the code's git state
    unknown, another branch, uncommitted changes, or the experiment folder outside loralab's tree);
    None for a main run: branch ``main``, clean, the experiment committed in the same tree."""
    if git.get("branch") == UNKNOWN or git.get("dirty") == UNKNOWN:
        return ("the code's git state is unknown (no git work tree; a launcher may state it with "
                "LORALAB_GIT_COMMIT / LORALAB_GIT_BRANCH / LORALAB_GIT_DIRTY)")
    if git.get("branch") != "main":
        return f"the code is on branch {git.get('branch')}, not main"
    if git.get("dirty") is not False:
        loose = git.get("untracked")
        if not loose:
            return "the code has uncommitted changes"
        changed = "uncommitted changes, and " if git.get("tracked_changes") else ""
        return f"the code has {changed}files git does not track in its folder ({', '.join(loose[:3])})"
    if git.get("experiment_committed") is False:
        loose = git.get("experiment_untracked")
        return ("the experiment folder is not committed in loralab's tree" if not loose
                else f"the experiment folder has files git does not track ({', '.join(loose[:3])})")
    return None


def route(status: str, git: dict) -> Path:
    """The folder a record goes to: ``results/`` for a successful main run (``not_main_run``),
    ``cancelled_results/`` for a cancelled one, ``temporary_results/`` otherwise."""
    if status == "cancelled":
        folder = "cancelled_results"
    elif status == "success" and not_main_run(git) is None:
        folder = "results"
    else:
        folder = "temporary_results"
    return results_root() / folder


def route_reason(git: dict) -> str:
    """Why a successful run's record goes where ``route`` sends it, for the run's opening line."""
    return not_main_run(git) or f"main at {str(git.get('commit'))[:7]}, clean, experiment committed"


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
    """The current UTC time to the second in ISO 8601 with ``Z`` for UTC, e.g. ``2026-12-04T22:05:21Z``:
    a record's ``created_at`` (Python's ``datetime.fromisoformat`` reads it). File and folder names
    carry it through ``stamp``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stamp(created_at: str) -> str:
    """The file- and folder-name form of an ISO 8601 time with an offset: converted to UTC, colons as
    dashes, ``Z`` for UTC, e.g. ``2026-12-04T22:05:21Z`` and ``2026-12-04T23:05:21+01:00`` both give
    ``2026-12-04T22-05-21Z`` (the old sanitised ``...T22-05-21-00-00`` read like part of the time).
    Result files (``write_result``) and run output folders are named with it. Raises ValueError for
    a string that is not an ISO 8601 time or has no offset."""
    when = datetime.fromisoformat(created_at)
    if when.tzinfo is None:
        raise ValueError(f"{created_at!r} has no UTC offset (loralab writes UTC times ending in 'Z')")
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")


class InvalidRecord(ValueError):
    """A result record that does not validate; it was not written."""


def validate(record: dict) -> list[str]:
    """Every problem of a result record: missing sections/keys, wrong types, unknown status, and any
    NaN or infinity (strict JSON has none). Used by tests, by readers and before every write."""
    problems = []
    for section, keys in REQUIRED.items():
        if not isinstance(record.get(section), dict):
            problems.append(f"missing section {section}" if section not in record else f"{section} must be an object")
            continue
        for key in keys:
            if key not in record[section]:
                problems.append(f"missing {section}.{key}")
    run_info, train_info = record.get("run_info") or {}, record.get("train_info") or {}
    if not isinstance(record.get("eval"), dict):
        record = {**record, "eval": {}}
    for name, value in record["eval"].items():
        if name == "degenerate":  # loralab.tasks.metrics: the names of metrics scored by the degenerate rule
            if not isinstance(value, list) or not all(isinstance(v, str) and v in record["eval"] and v != name for v in value):
                problems.append(f"eval.degenerate = {value!r}: must list names of eval's metrics")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"eval.{name} = {value!r}: eval maps metric names to numbers")
    for key, kinds in TYPES.items():
        section, name = key.split(".")
        if name not in (record.get(section) or {}):
            continue  # named above when required
        value = record[section][name]
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            allowed = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            problems.append(f"{key} = {value!r}: must be {allowed}")
    git = run_info.get("git")
    if isinstance(git, dict):
        for key in ("commit", "branch", "dirty"):
            if key not in git:
                problems.append(f"missing run_info.git.{key}")
        if git.get("dirty") not in (True, False, None, UNKNOWN):  # None: records before "unknown" existed
            problems.append(f"run_info.git.dirty = {git.get('dirty')!r}: must be true, false or {UNKNOWN!r}")
    created_at = run_info.get("created_at")
    if isinstance(created_at, str):
        try:
            stamp(created_at)
        except ValueError:
            problems.append(f"run_info.created_at = {created_at!r}: must be an ISO 8601 time with a UTC offset")
    status = train_info.get("status")
    if status not in STATUSES:
        problems.append(f"train_info.status = {status!r}; allowed: {', '.join(STATUSES)}")
    if status in ("failed", "diverged"):
        error = train_info.get("error") or {}
        for key in ("type", "message", "phase"):
            if key not in error:
                problems.append(f"a {status} record needs train_info.error.{key}")
    problems += [f"{where} = {value!r}: not finite (strict JSON has no NaN or infinity)"
                 for where, value in _non_finite(record)]
    return problems


TYPES = {  # section.key: allowed types (bool only where named)
    "run_info.created_at": (str,),
    "run_info.total_time": (int, float),
    "run_info.experiment_name": (str,),
    "run_info.git": (dict,),
    "run_info.train_params_sha": (str,),
    "run_info.peft_config_sha": (str, type(None)),
    "run_info.config": (dict,),
    "train_info.train_time": (int, float),
    "train_info.trainable_params": (int, type(None)),
    "train_info.file_size": (int, type(None)),
    "train_info.metrics": (list,),
    "meta_info.model": (dict, str),
    "meta_info.dataset": (dict,),
    "meta_info.package_info": (dict,),
    "meta_info.system_info": (dict,),
}


def _non_finite(value, where: str = ""):
    if isinstance(value, float) and not math.isfinite(value):
        yield where or "record", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _non_finite(item, f"{where}[{i}]")


def _plain(value):
    """JSON's own types: numpy scalars become numbers, paths and other objects their ``str`` (as the
    writer always did); floats stay as they are so that validation sees a NaN."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:  # numpy / torch scalar
        return value.item()
    return str(value)


def write_result(record: dict, git: dict) -> Path:
    """Validate ``record`` and write it as strict JSON (``allow_nan=False``), atomically, where its
    status and git state route it. A record that does not validate is not written: InvalidRecord
    names every problem (the run reports it and exits 1)."""
    record = _plain(record)
    problems = validate(record)
    if problems:
        raise InvalidRecord("result record not written: " + "; ".join(problems))
    status = record["train_info"]["status"]
    folder = route(status, git)
    folder.mkdir(parents=True, exist_ok=True)
    stem = record["run_info"]["experiment_name"].replace("/", "--")
    path = folder / f"{stem}--{stamp(record['run_info']['created_at'])}.json"
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(record, indent=2, allow_nan=False))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
