"""The document ``loralab eval`` prints and writes (``--output``): evaluation name -> its metrics, plus
reserved top-level keys that are not evaluations (``RESERVED``):

- ``meta_info``: what was scored, so that a number can be traced later (the same name, and the same
  helpers, as a run record's ``meta_info``: ``results``' sha256 of files, git state, packages, system):
  ``model`` (``models.model_provenance``: hub id + revision, or a local folder's content sha256; and
  where the id came from), ``adapter`` (its folder, the sha256 of each weight file and of its
  adapter_config.json, the base it records), ``generations`` (the file re-scored, with its sha256),
  ``data`` (per evaluation, what its loader read: ``Eval.source``'s file with its sha256, or the hub
  dataset with its config and split that stands in without a data folder; GLUE: the dev split),
  ``settings`` (every flag as parsed, ``--options`` as JSON, ``data_dir`` the folder used, $LORALAB_DATA_DIR
  included), ``created_at``, ``git``,
  ``package_info``, ``system_info``.
- ``interrupted``: after SIGINT/SIGTERM, ``{signal, finished, unfinished}``.

No evaluation is named like a reserved key (``tests/test_eval_provenance.py``). Readers of an output take
the evaluations with ``task_metrics``.
"""

from __future__ import annotations

from pathlib import Path

from loralab import results
from loralab.models import model_provenance
from loralab.tasks import glue
from loralab.tasks.registry import EVALS

META_KEY = "meta_info"
RESERVED = (META_KEY, "interrupted")
"""Top-level keys of an eval output that are not evaluations."""
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def task_metrics(output: dict) -> dict:
    """An eval output's evaluations only: name -> metrics (``RESERVED`` keys dropped)."""
    return {k: v for k, v in output.items() if k not in RESERVED}


def adapter_provenance(folder) -> dict:
    """``{"path", "weights": {file name: sha256}, "config_sha256", "base_model_name_or_path"}`` of a peft
    adapter folder (absolute path; every ``.safetensors``/``.bin`` file in it). Raises OSError when a file
    cannot be read."""
    import json

    folder = Path(folder).resolve()
    config = folder / "adapter_config.json"
    weights = {p.name: results.sha256_file(p) for p in sorted(folder.iterdir()) if p.suffix in WEIGHT_SUFFIXES}
    recorded = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    return {"path": str(folder), "weights": weights,
            "config_sha256": results.sha256_file(config) if config.is_file() else None,
            "base_model_name_or_path": recorded.get("base_model_name_or_path")}


def data_provenance(name: str, data_dir) -> dict:
    """What evaluation ``name``'s loader reads with the data folder ``data_dir`` (None: the hub):
    ``{"read": "file", "path", "sha256", "copy_of"}`` where the file ``Eval.source`` names is there (``copy_of``:
    the hub dataset, config and split it stands for), else ``{"read": "hub", "hub"}``; GLUE tasks: their
    dev split; lm-eval bridges: the harness's own download. ``description`` is the evaluation's line in
    ``loralab tasks``."""
    if name in glue.TASKS:
        task = glue.TASKS[name]
        hub = f"{glue.HUB_ID} ({task.hub_name}, validation)"
        if data_dir:
            path = (task.folder_path(data_dir) / "dev.tsv").resolve()
            return {"read": "file", "path": str(path), "sha256": results.sha256_file(path), "copy_of": hub}
        return {"read": "hub", "hub": hub}
    ev = EVALS[name]
    if ev.source is None:
        return {"read": "lm-eval's own download", "description": ev.description}
    if data_dir is not None and ev.source.path(data_dir).is_file():
        path = ev.source.path(data_dir).resolve()
        return {"read": "file", "path": str(path), "sha256": results.sha256_file(path), "copy_of": ev.source.hub,
                "description": ev.description}
    return {"read": "hub", "hub": ev.source.hub, "description": ev.description}


def meta_info(names: list[str], *, data_dir, settings: dict, model: str | None = None, model_from: str | None = None,
              adapter: str | None = None, generations: str | None = None) -> dict:
    """The ``meta_info`` of an eval output (module docstring) for the evaluations ``names``. ``model``:
    the model id scored (None when re-scoring ``generations``), ``model_from``: where that id came from
    (``--model``, or the adapter's ``base_model_name_or_path``). A file that cannot be read is recorded
    as ``{"error": ...}`` rather than losing the scores already computed."""
    def guarded(fn, *args):
        try:
            return fn(*args)
        except (OSError, ValueError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    meta = {"created_at": results.now_iso(), "settings": settings}
    meta["model"] = None if model is None else {**guarded(model_provenance, model), "from": model_from}
    meta["adapter"] = None if adapter is None else guarded(adapter_provenance, adapter)
    if generations is not None:
        meta["generations"] = guarded(lambda p: {"path": str(Path(p).resolve()), "sha256": results.sha256_file(p)},
                                      generations)
    meta["data"] = {name: guarded(data_provenance, name, data_dir) for name in names}
    meta.update(git=results.git_state(), package_info=results.package_info(), system_info=results.system_info())
    return meta


def meta_info_of_call(args, names: list[str]) -> dict:
    """``meta_info`` of a ``loralab eval`` call from its parsed flags (``args``: ``commands.eval``'s, after
    ``--model`` was taken from the adapter where absent) for the evaluations ``names``. Never raises: it is
    computed after every evaluation ran, so a failure is recorded as ``{"error": ...}`` instead of losing
    the scores."""
    import json
    import os

    try:
        settings = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "model_from_adapter")}
        settings["options"] = json.loads(args.options)  # valid JSON: checked before anything ran
        settings["data_dir"] = data_dir = args.data_dir or os.environ.get("LORALAB_DATA_DIR")  # the folder used
        source = "the adapter's base_model_name_or_path" if getattr(args, "model_from_adapter", False) else "--model"
        return meta_info(names, data_dir=data_dir, settings=settings, model=None if args.generations else args.model,
                         model_from=source, adapter=args.adapter, generations=args.generations)
    except Exception as exc:  # noqa: BLE001 - the scores are computed already; provenance must not cost them
        return {"error": f"{type(exc).__name__}: {exc}"}
