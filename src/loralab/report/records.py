"""Result files → ``Run`` objects: what each run *recorded* (method parts, task, seed, experiment
set, metrics, history, cost, configuration, environment, git state), never where its file lies.

Reading order for each field (newer records first, then the fallback every older record has):

* task:   ``run_info.task`` → ``run_info.config.training_parameters.task`` → ``meta_info.dataset.task``
* seed:   ``run_info.seed`` → ``training_parameters.seed``
* method: ``run_info.method_parts`` {layer, init, optimizer} → derived from ``run_info.method``,
  ``training_parameters`` (``init``, ``optimizer``) and the adapter config (``use_dora``,
  ``use_rslora``, ``init_lora_weights``, ``corda_config.corda_method``)
* headline: ``meta_info.dataset.headline`` (the metric the run's task names for tables: written by
  the task since issue 19; GLUE its first metric, an SFT run ``<first evaluation>/<its headline>``)
  → None, and the tables fall back to their convention (``tables.headline_metric``)
* experiment set: the first component of ``run_info.experiment_name`` (``glue-minilm`` in
  ``glue-minilm/lora/mrpc``; a name without ``/``, from a folder outside ``experiments/``, is its own set).

Two runs of the same method label and task whose configurations differ in anything other than
bookkeeping (``IGNORED_KEYS``: seed, task, data folder, logging cadence, ...) are different
*variants*: the keys that differ are appended to the label (``SVD LoRA-FA (r=4, lr=0.0004)``), so
they are never averaged together as if they were seeds. Two experiment folders that ran the same
label, task and seed are told apart by their names (``identity.py``: ``LoRA [lora-long]``).
"""

from __future__ import annotations

import ast
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from loralab.report.identity import qualify_experiments
from loralab.tasks.metrics import DEGENERATE, convention

STATUSES = ("success", "failed", "cancelled", "diverged")

# How a name from the registry is written in a table (seed 000's spelling); unknown names print as recorded.
DISPLAY = {
    "full": "Full FT", "lora": "LoRA", "rslora": "rsLoRA", "dora": "DoRA", "pissa": "PiSSA",
    "olora": "OLoRA", "corda": "CorDA", "lorafa": "LoRA-FA", "svd_lorafa": "SVD LoRA-FA",
    "svd_lorafa_corrected": "SVD LoRA-FA corrected", "lorafa_qr": "LoRA-FA QR-init",
    "magnitude_only": "DoRA (magnitude-only)", "eva": "EVA", "milora": "MiLoRA", "loftq": "LoftQ",
    "lora_ga": "LoRA-GA", "loraplus": "LoRA+", "corda_ipa": "CorDA (IPA)", "corda_kpa": "CorDA (KPA)",
    "dora_magnitude_only": "DoRA (magnitude-only)", "nf4": "QLoRA (NF4)",
}
CORDA_MODES = {"ipm": "IPA", "kpm": "KPA"}
# The parts a plain LoRA run has; a label names only the parts that differ from these.
DEFAULT_PARTS = {"layer": ("lora", None, ""),
                 "init": (None, "", "default", "none", "lora", "kaiming", "gaussian", "true", "True", True),
                 "optimizer": ("adamw", "adamw_torch", None, "")}
# Configuration keys that do not change what is trained or measured (so runs differing only here
# are replicates, not variants). Dotted paths into training_parameters / adapter_config.
IGNORED_KEYS = {
    "task", "seed", "data_dir", "device", "eval_steps", "logging_steps", "eval_batch_size", "calibration.seed",
    "base_model_name_or_path", "revision", "peft_version", "task_type", "inference_mode", "auto_mapping",
    "generation.batch_size", "generation.backend",
}
IGNORED_PREFIXES: tuple[str, ...] = ()
PEFT_HEAD_NAMES = frozenset({"classifier", "score", "pre_classifier"})
"""Names peft itself adds to a classification adapter's ``modules_to_save`` (peft/peft_model.py: "classifier" and
"score" in peft 0.21, with "pre_classifier" since 0.22, 0.21 appending them even where present): which of them a
record lists tells the peft version, not the variant, so ``flat_config`` leaves them out of the comparison."""
GENERATIVE_KEYS = ("generation.", "eval_tasks", "eval_options")
"""Keys that only steer generative evaluation: ignored for classification runs (``glue/...``), where
no text is generated, so GLUE runs that differ only there stay seeds of one variant."""
SHORT_KEYS = {"learning_rate": "lr", "lora_alpha": "alpha", "num_epochs": "epochs", "batch_size": "batch",
              "max_train_samples": "train samples", "warmup_ratio": "warmup"}


class RecordError(ValueError):
    """A JSON file that is a result record but cannot be read as one (names the bad field)."""


@dataclass
class Run:
    """One result record. ``metrics`` are the final evaluation (name → number, as recorded, not
    scaled); ``degenerate`` the names among them the record flags (``eval.degenerate``: scored by
    the convention of ``loralab.tasks.metrics``, not measured); memory in bytes; times in seconds."""

    source: Path
    status: str
    experiment: str
    experiment_set: str
    method: str  # the recorded registry name (``run_info.method``)
    parts: dict  # {layer, init, optimizer}
    label: str  # display label, variant qualifiers included once ``assign_labels`` ran
    task: str
    seed: int | None
    model: str | None
    created_at: str
    metrics: dict
    history: list
    trainable_params: int | None
    train_time: float | None
    total_time: float | None
    peak_memory: int | None
    memory_kind: str | None  # "cuda" (max allocated) or "rss" (CPU peak resident set)
    config: dict
    git: dict
    environment: dict
    train_info: dict
    error: dict | None = None
    variant: dict = field(default_factory=dict)
    init_cost: dict | None = None  # run_info.init_cost: the adapter init's seconds and peak memory
    headline: str | None = None  # the recorded headline metric (meta_info.dataset.headline); None in older records
    degenerate: frozenset = frozenset()

    def axis(self, name: str):
        """The value of a grouping field (``--by``): method, task, set, seed, model, layer, init, optimizer (an
        ``evaluation`` is a metric's, not a run's: ``evals.eval_points``)."""
        if name in ("layer", "init", "optimizer"):
            return str(self.parts.get(name) or "default")
        return {"method": self.label, "task": self.task, "set": self.experiment_set, "seed": self.seed,
                "model": self.model}[name]


AXES = ("method", "task", "set", "seed", "model", "layer", "init", "optimizer", "evaluation")


@dataclass
class Problem:
    """A file the report could not use, and why (shown by name in every output format)."""

    path: Path
    reason: str
    kind: str  # "unreadable" (bad JSON, bad record) or "not a record" (another kind of JSON file)


def find_files(paths) -> list[Path]:
    """Every ``*.json`` under the given folders (recursively) plus the given files, sorted, unique.

    Raises FileNotFoundError naming a path that does not exist."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("*.json")))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    seen, out = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def load_runs(paths) -> tuple[list[Run], list[Problem]]:
    """Read every result file under ``paths``. A file that is not valid JSON, or a result record
    with a missing/ill-typed field, becomes a ``Problem`` naming it; the others are still read.
    JSON files that are not result records (bench tables, eval scores) are ``Problem(kind="not a record")``.
    Labels (with variant qualifiers, and experiment names where two experiments ran the same) are assigned before
    returning."""
    runs, problems = [], []
    for f in find_files(paths):
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            problems.append(Problem(f, f"not valid JSON ({exc})", "unreadable"))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(f, f"cannot be read ({exc})", "unreadable"))
            continue
        if not (isinstance(data, dict) and "run_info" in data and "train_info" in data):
            problems.append(Problem(f, "not a result record (no run_info/train_info)", "not a record"))
            continue
        try:
            runs.append(parse_record(data, f))
        except RecordError as exc:
            problems.append(Problem(f, f"invalid result record: {exc}", "unreadable"))
    assign_labels(runs)
    qualify_experiments(runs)
    return runs, problems


def _section(record: dict, name: str) -> dict:
    value = record.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecordError(f"{name} must be an object, got {type(value).__name__}")
    return value


def _number(value, where: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{where} = {value!r} is not a number")
    return value


def parse_record(record: dict, source: Path) -> Run:
    """One record → ``Run``. Raises RecordError naming the first field it cannot read."""
    run_info = _section(record, "run_info")
    train_info = _section(record, "train_info")
    meta = _section(record, "meta_info")
    config = run_info.get("config") or {}
    if not isinstance(config, dict):
        raise RecordError("run_info.config must be an object")
    params = config.get("training_parameters") or {}
    adapter = config.get("adapter_config")
    status = train_info.get("status")
    if status not in STATUSES:
        raise RecordError(f"train_info.status = {status!r}; allowed: {', '.join(STATUSES)}")
    name = run_info.get("experiment_name")
    if not isinstance(name, str) or not name:
        raise RecordError(f"run_info.experiment_name = {name!r} is not a name")
    task = run_info.get("task") or params.get("task") or (meta.get("dataset") or {}).get("task")
    if not isinstance(task, str):
        if status == "success":
            raise RecordError("no task recorded (run_info.task, run_info.config.training_parameters.task)")
        task = "unknown"  # a run that failed early may not have got that far; it is still listed
    seed = run_info.get("seed", params.get("seed"))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RecordError(f"seed = {seed!r} is not an integer")
    evals = record.get("eval") or {}
    if not isinstance(evals, dict):
        raise RecordError(f"eval must map names to numbers, got {type(evals).__name__}")
    degenerate = evals.get(DEGENERATE, [])
    if not (isinstance(degenerate, list) and all(isinstance(d, str) for d in degenerate)):
        raise RecordError(f"eval.{DEGENERATE} = {degenerate!r} is not a list of metric names")
    evals = {k: v for k, v in evals.items() if k != DEGENERATE}
    metrics = {k: v for k, v in evals.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if status == "success" and len(metrics) != len(evals):
        bad = next(k for k in evals if k not in metrics)
        raise RecordError(f"eval.{bad} = {evals[bad]!r} is not a number")
    if unknown := [d for d in degenerate if d not in metrics]:
        raise RecordError(f"eval.{DEGENERATE} names {unknown[0]!r}, which eval does not hold")
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):  # a record written before issue 21's rule
            metrics[k], degenerate = convention(k), [*degenerate, k]
    history = train_info.get("metrics") or []
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise RecordError("train_info.metrics must be a list of objects")
    if "cuda_memory_max" in train_info:
        memory, kind = _number(train_info["cuda_memory_max"], "train_info.cuda_memory_max"), "cuda"
    elif "peak_rss" in train_info:
        memory, kind = _number(train_info["peak_rss"], "train_info.peak_rss"), "rss"
    else:
        memory, kind = None, None
    method = run_info.get("method") or "unknown"
    parts = run_info.get("method_parts") or derive_parts(method, params, adapter)
    parts = {k: parts.get(k) for k in ("layer", "init", "optimizer")}
    if adapter is None and parts["layer"] in (None, "", "none"):
        parts["layer"] = "full"  # no adapter config: full fine-tuning, whatever the parts say
    error = train_info.get("error")
    headline = (meta.get("dataset") or {}).get("headline") if isinstance(meta.get("dataset"), dict) else None
    if headline is not None and not isinstance(headline, str):
        raise RecordError(f"meta_info.dataset.headline = {headline!r} is not a metric name")
    return Run(
        source=source, status=status, experiment=name,
        experiment_set=name.split("/")[0],
        method=method, parts=parts, label=base_label(parts, adapter, method), task=task, seed=seed,
        model=params.get("model_id") or (meta.get("model") or {}).get("model_id"),
        created_at=str(run_info.get("created_at", "")), metrics=metrics, history=history,
        trainable_params=_number(train_info.get("trainable_params"), "train_info.trainable_params"),
        train_time=_number(train_info.get("train_time"), "train_info.train_time"),
        total_time=_number(run_info.get("total_time"), "run_info.total_time"),
        peak_memory=memory, memory_kind=kind, config=config, git=run_info.get("git") or {},
        environment=meta, train_info=train_info, error=error if isinstance(error, dict) else None,
        init_cost=_init_cost(run_info),
        headline=headline, degenerate=frozenset(degenerate),
    )


def _init_cost(run_info: dict) -> dict | None:
    """``run_info.init_cost``, where the run started from a decomposition's saved folder (``init_adapter`` on a
    ``decompose --save-path`` residual model) with the decomposition's seconds added (``decomposition_seconds``
    says how many): the run itself only loaded the adapter, and a cost table without them would show such a
    CorDA run as cheaper than one that calibrated in-process. None where the record has no init cost."""
    cost = run_info.get("init_cost")
    if not isinstance(cost, dict):
        return None
    folder = run_info.get("init_adapter")
    seconds = ((folder or {}).get("decomposition") or {}).get("seconds") if isinstance(folder, dict) else None
    if not isinstance(seconds, int | float) or not isinstance(cost.get("seconds"), int | float):
        return cost
    return {**cost, "seconds": cost["seconds"] + seconds, "decomposition_seconds": seconds}


def derive_parts(method: str, params: dict, adapter: dict | None) -> dict:
    """{layer, init, optimizer} for records older than ``run_info.method_parts``: from the
    recorded configuration (the same keys the method registry reads)."""
    if adapter is None:
        return {"layer": "full", "init": None, "optimizer": params.get("optimizer", "adamw")}
    layer = "dora" if adapter.get("use_dora") else "lora"
    if layer == "dora" and params.get("magnitude_only_modules"):
        layer = "magnitude_only"
    init = params.get("init")
    if init is None:
        weights = adapter.get("init_lora_weights")
        if isinstance(weights, str):
            init = "pissa" if weights.lower().startswith("pissa") else weights.lower()
    return {"layer": layer, "init": init, "optimizer": params.get("optimizer", "adamw")}


def base_label(parts: dict, adapter: dict | None, method: str) -> str:
    """Display label from the method parts: the non-default parts joined by ' + ' (PiSSA,
    PiSSA + LoRA-FA, DoRA), CorDA with its mode (CorDA (IPA)), rsLoRA scaling noted."""
    names = []
    layer, init, opt = parts.get("layer"), parts.get("init"), parts.get("optimizer")
    if layer == "full":
        return DISPLAY["full"] + ("" if opt in DEFAULT_PARTS["optimizer"] else f" + {DISPLAY.get(opt, opt)}")
    if layer not in DEFAULT_PARTS["layer"]:
        names.append(DISPLAY.get(layer, str(layer)))
    if init not in DEFAULT_PARTS["init"]:
        name = DISPLAY.get(init, str(init))
        if init == "corda":
            mode = ((adapter or {}).get("corda_config") or {}).get("corda_method")
            name += f" ({CORDA_MODES.get(mode, mode)})" if mode else ""
        names.append(name)
    # seed 003's SVD LoRA-FA inits train with the LoRA-FA update; the init's name already says so
    if opt not in DEFAULT_PARTS["optimizer"] and not (init in ("svd_lorafa", "svd_lorafa_corrected", "lorafa_qr") and opt == "lorafa"):
        names.append(DISPLAY.get(opt, str(opt)))
    if (adapter or {}).get("use_rslora"):
        names.append(DISPLAY["rslora"])
    if not names:
        names.append(DISPLAY.get("lora"))
    return " + ".join(names)


def _normalise(value):
    if isinstance(value, str) and value[:1] in "{[(" and value[-1:] in "}])":
        try:
            value = ast.literal_eval(value)  # a set stored through json.dumps(default=str)
        except (ValueError, SyntaxError):
            return value
    if isinstance(value, (set, frozenset, list, tuple)):
        return tuple(sorted(map(str, value)))
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.12g}")
    return value


def flat_config(run: Run) -> dict:
    """training_parameters and adapter_config flattened to dotted keys (adapter keys prefixed
    ``adapter.`` only where they clash), minus ``IGNORED_KEYS`` (and ``GENERATIVE_KEYS`` for a
    classification run); values normalised (sets sorted; a classification adapter's ``modules_to_save`` without
    ``PEFT_HEAD_NAMES``)."""
    out = {}
    ignored = IGNORED_PREFIXES + (GENERATIVE_KEYS if run.task.startswith("glue/") else ())

    def walk(obj, prefix):
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if key in IGNORED_KEYS or key.startswith(ignored):
                continue
            if isinstance(v, dict) and v:
                walk(v, key + ".")
            else:
                out[key] = _normalise(v)

    walk(run.config.get("training_parameters") or {}, "")
    adapter = run.config.get("adapter_config") or {}
    flat_adapter = {}
    saved, out = out, {}
    walk(adapter, "")
    flat_adapter, out = out, saved
    if adapter.get("task_type") in ("SEQ_CLS", "TOKEN_CLS") and isinstance(flat_adapter.get("modules_to_save"), tuple):
        flat_adapter["modules_to_save"] = tuple(sorted(set(flat_adapter["modules_to_save"]) - PEFT_HEAD_NAMES)) or None
    for k, v in flat_adapter.items():
        out[f"adapter.{k}" if k in out else k] = v
    return out


def assign_labels(runs: list[Run]) -> None:
    """Append variant qualifiers to labels: within one experiment set, label and task, the
    configuration keys whose values differ between runs name the variant (``r=4, lr=0.0004``)."""
    groups = defaultdict(list)
    for r in runs:
        groups[(r.experiment_set, r.label)].append(r)
    for members in groups.values():
        flats = [flat_config(r) for r in members]
        differing: set[str] = set()
        by_task = defaultdict(list)
        for r, f in zip(members, flats):
            by_task[r.task].append(f)
        for fs in by_task.values():
            keys = set().union(*fs)
            # a key only some records have (an older record format) is not a difference
            differing |= {k for k in keys if len({repr(f[k]) for f in fs if k in f}) > 1}
        for r, f in zip(members, flats):
            r.variant = {k: f.get(k) for k in sorted(differing)}
            if differing:
                r.label += " (" + ", ".join(f"{SHORT_KEYS.get(k, k)}={_show(f.get(k))}" for k in sorted(differing)) + ")"


def _show(value) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(value) + "]"
    return str(value)
