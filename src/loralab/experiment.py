"""Experiment folders (seed 004's format): ``adapter_config.json`` (any peft config, as written by
``LoraConfig(...).save_pretrained``; absent = full fine-tuning) and ``training_parameters.json``
(only what differs from the defaults in ``loralab.config``). Reading one checks everything that
can be checked without loading a model and raises one ConfigError listing every problem.

The checks that need the registries (the methods' inits and optimizers, CorDA's options, the
tasks) are made here, a floor above them, and reported together with config's own problems. A bad value
does not hide them: they run with every key a problem names back at its default (``read_experiment``).

A run from a saved adapter (training_parameters ``init_adapter``, seed 001's step 2) trains with the
folder's adapter_config.json (``init_adapter_config``: the experiment's own may only add what leaves the
weights' meaning alone) on the base the adapter belongs to (``init_adapter_base_problems``), checked here too.

What needs the model's module names and layer shapes (``target_modules`` typos, ``null`` and ``all-linear``, ranks,
``modules_to_save``, ``magnitude_only_modules``) is checked on its weightless skeleton (``skeleton_problems``), so
those problems come with the others, before ``loralab run`` downloads or loads any weights.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab import methods
from loralab.config import ConfigError, TrainingParameters, build_parameters, not_allowed, suggest
from loralab.decomposition.calibration import canonical_name
from loralab.decomposition.corda import check_options
from loralab.init_adapter import (
    TASK_TYPES,
    init_adapter_base_problems,
    init_adapter_config,
    named_config,
    read_init_adapter,
)
from loralab.merge import quiet_corda_config
from loralab.models import check_model_id
from loralab.results import sha256_json
from loralab.skeleton import build_skeleton
from loralab.speed_settings import Speed
from loralab.tasks.generation import setting_problems

ADAPTER_FILE = "adapter_config.json"
PARAMS_FILE = "training_parameters.json"

NOT_HASHED = ("report_to", "logging_dir", "wandb_project")
"""Keys that change where curves are mirrored, never a number: left out of ``train_params_sha``, so
turning a tracker on neither blocks ``--resume`` nor reruns a sweep's finished experiments."""


ADDED = {"init_adapter": None}
"""Top-level parameters added after experiments were hashed, with their defaults: left out of
``train_params_sha`` at the default, so an existing experiment's hash (``--resume``, sweeps) is unchanged."""


def hashed_parameters(params: TrainingParameters) -> dict[str, Any]:
    """The parameters ``train_params_sha`` covers: all but ``NOT_HASHED``.

    ``eval_tasks`` null (unset: the task's default evaluations) hashes as ``[]``, the old default
    that meant the same, so the hashes of experiments that do not set it are unchanged; an
    explicit ``[]`` (no evaluation, issue 24; it used to mean the default) hashes as ``"none"``."""
    out = {k: v for k, v in params.to_dict().items() if k not in NOT_HASHED}
    # a speed key added later is hashed only away from its default (and any default it had before)
    added = {f.name: (f.default, *f.metadata.get("old_defaults", ())) for f in dataclasses.fields(Speed)
             if f.metadata.get("added")}
    out["speed"] = {k: v for k, v in out["speed"].items() if not (k in added and any(v == d for d in added[k]))}
    for key, default in ADDED.items():  # a key added later is hashed only away from its default, as speed's
        if out.get(key) == default:
            out.pop(key, None)
    if out.get("eval_tasks") is None:
        out["eval_tasks"] = []
    elif out["eval_tasks"] == []:
        out["eval_tasks"] = "none"
    return out


@dataclass
class Experiment:
    path: Path
    name: str
    params: TrainingParameters
    peft_config: Any  # a peft config, or None for full fine-tuning
    train_params_sha: str
    peft_config_sha: str | None


def registry_problems(values: dict[str, Any]) -> list[str]:
    """The training parameters only the registries above ``config`` can check, one problem per
    line, worded as config's own: 'init' and 'optimizer' against the methods registry
    (``methods.PARAM_INITS`` / ``PARAM_OPTIMIZERS``, with "did you mean") and
    'calibration.corda_options' against CorDA's options (``decomposition.corda.check_options``).
    ``values``: a merged parameter dict whose types ``config.check_parameters`` has checked."""
    problems = not_allowed(values, "optimizer", methods.PARAM_OPTIMIZERS)
    problems += not_allowed(values, "init", methods.PARAM_INITS)
    if isinstance(values["calibration"]["corda_options"], dict):
        try:
            check_options(values["calibration"]["corda_options"])
        except ValueError as exc:
            problems.append(f"'calibration.corda_options': {exc}")
    dataset = values["calibration"]["dataset"]
    if dataset is not None:
        try:
            canonical_name(str(dataset))
        except ValueError as exc:
            problems.append(f"'calibration.dataset' = {dataset!r}: {exc}")
    generation = {k: v for k, v in values["generation"].items() if v is not None and k != "max_new_tokens"}  # config's
    problems += [f"'generation.{name}' = {value!r} {rule}" for name, value, rule in setting_problems(generation)]
    return problems


def checked_parameters(overrides: dict[str, Any], source: str = PARAMS_FILE) -> TrainingParameters:
    """``config.build_parameters`` of ``overrides`` (a ``training_parameters.json`` dict) with the
    registry checks (``registry_problems``) reported together with config's own problems; raises
    ConfigError naming every problem (``source`` names the file)."""
    return build_parameters(overrides, source=source, checks=(registry_problems,))


_NAMED_KEY = re.compile(r"^(?:unknown key )?'([^'.]+)")
"""The top-level parameter a problem line is about: config's lines begin with it quoted (``'batch_size' = ...``,
``'calibration.num_samples' = ...``, ``unknown key 'lerning_rate'``)."""


def _checked_without(overrides: dict[str, Any], keys: set[str]) -> TrainingParameters | None:
    """``checked_parameters`` of ``overrides`` less ``keys`` (back at their defaults); None where that still fails."""
    try:
        return checked_parameters({k: v for k, v in overrides.items() if k not in keys})
    except ConfigError:
        return None


def experiment_name(path: Path) -> str:
    """``<method>/<name>`` relative to the nearest ``experiments`` folder, else the folder name."""
    parts = path.resolve().parts
    if "experiments" in parts:
        idx = len(parts) - 1 - parts[::-1].index("experiments")
        rest = parts[idx + 1 :]
        if rest:
            return "/".join(rest)
    return path.resolve().name


def _read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        problems.append(f"{path.name}: not valid JSON ({exc})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name}: must hold a JSON object, got {type(data).__name__}")
        return None
    return data


def load_peft_config(data: dict, problems: list[str]):
    """A peft config from adapter_config.json data; unknown keys and bad values become problems."""
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = data.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        problems.append(f"adapter_config.json 'peft_type' = {peft_type!r} is unknown{suggest(str(peft_type), PEFT_TYPE_TO_CONFIG_MAPPING)}")
        return None
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            problems.append(f"adapter_config.json: unknown key '{key}'{suggest(key, fields)}")
        else:
            kwargs[key] = value
    if peft_type == "LORA":
        r = kwargs.get("r", 8)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            problems.append(f"adapter_config.json 'r' = {r!r} must be a positive integer")
        alpha = kwargs.get("lora_alpha", 8)
        if not isinstance(alpha, (int, float)) or alpha <= 0:
            problems.append(f"adapter_config.json 'lora_alpha' = {alpha!r} must be a positive number")
        dropout = kwargs.get("lora_dropout", 0.0)
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            problems.append(f"adapter_config.json 'lora_dropout' = {dropout!r} must be in [0, 1)")
        targets = kwargs.get("target_modules")
        if not (targets is None or isinstance(targets, str)
                or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            problems.append(f"adapter_config.json 'target_modules' = {targets!r} must be a name, a regex or a list of names")
        init = kwargs.get("init_lora_weights", True)
        if not isinstance(init, (bool, str)):
            problems.append(f"adapter_config.json 'init_lora_weights' = {init!r} must be true, false or a method name")
        for flag in ("use_dora", "use_rslora"):
            if not isinstance(kwargs.get(flag, False), bool):
                problems.append(f"adapter_config.json '{flag}' = {kwargs[flag]!r} must be true or false")
        if kwargs.get("init_lora_weights") == "corda":
            method = (kwargs.get("corda_config") or {}).get("corda_method") if isinstance(kwargs.get("corda_config") or {}, dict) else None
            if method not in ("ipm", "kpm"):
                problems.append(f"adapter_config.json 'corda_config.corda_method' = {method!r} must be 'ipm' (IPA: "
                                "instruction-previewed) or 'kpm' (KPA: knowledge-preserved)")
        task_type = kwargs.get("task_type")
        if task_type is not None and not isinstance(task_type, str):
            problems.append(f"adapter_config.json 'task_type' = {task_type!r} must be a string such as CAUSAL_LM or SEQ_CLS")
    if any(p.startswith("adapter_config.json") for p in problems):
        return None
    try:
        config = cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever peft's __post_init__ rejects is bad input
        problems.append(f"adapter_config.json: {type(exc).__name__}: {exc}")
        return None
    if not isinstance(config, PeftConfig):  # pragma: no cover - mapping guarantees it
        problems.append("adapter_config.json: not a peft config")
    return config


def skeleton_problems(peft_config, params: TrainingParameters, task) -> list[str]:
    """The checks ``loralab.run.build`` makes on the loaded model, made on its skeleton (``skeleton.build_skeleton``:
    meta device, no weights) instead: ``target_modules`` null or "all-linear" resolved (``methods.common.resolve_config``),
    each listed name matched ("'target_modules' names 'querry', which matches no module of the model (did you mean
    'query'?)"), the method's checks on the layers (ranks, square layers, tied weights; ``Method.check`` less its
    ``conflicts``, which ``read_experiment`` reports), and ``modules_to_save`` / ``magnitude_only_modules`` names
    (``methods.common.name_problems``). ``task``: the training task (its ``kind`` and ``num_labels`` pick the model
    class). [] where there is no skeleton (a GGUF file not converted yet, a hub id offline and not cached): the
    load checks then, as before."""
    from loralab.methods import choose_method
    from loralab.methods.common import name_problems, resolve_config, unmatched_targets

    model = build_skeleton(params.model_id, task.kind, getattr(task, "num_labels", 2))
    if model is None:
        return []
    try:
        cfg = resolve_config(model, peft_config, task.kind)
    except ConfigError as exc:  # target_modules null and peft has no default for the model type
        return exc.problems
    except Exception:  # noqa: BLE001 - whatever else it raises, the loaded model's resolution raises
        return []
    try:
        method = choose_method(cfg, params)
        conflicts = method.conflicts(cfg, params)
        found = [p for p in method.check(model, cfg, params) if p not in conflicts]
    except ConfigError as exc:
        found = exc.problems
    except Exception:  # noqa: BLE001 - a layer check the meta device cannot answer: the load runs it; the names still
        found = unmatched_targets(model, cfg)  # are checked here, since a typo needs no weights
    try:
        names = name_problems(model, cfg, params)
    except Exception:  # noqa: BLE001 - as above: the loaded model's check
        names = []
    return found + [p for p in names if p not in found]


def read_experiment(path) -> Experiment:
    """Read and check an experiment folder; raises ConfigError with every problem found."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError([f"experiment folder {str(path)!r} does not exist"], str(path))
    problems: list[str] = []
    overrides: dict = {}
    params_path = path / PARAMS_FILE
    if not params_path.exists() and not (path / ADAPTER_FILE).exists() and not (path / "training_params.json").exists():
        inside = sorted(p.name for p in path.iterdir() if p.is_dir())[:3]
        raise ConfigError([f"{str(path)!r} holds neither {PARAMS_FILE} nor {ADAPTER_FILE}: not an experiment folder"
                           + (f" (its subfolders, e.g. {', '.join(inside)}, may be)" if inside else "")], str(path))
    if params_path.exists():
        overrides = _read_json(params_path, problems) or {}
    elif (path / "training_params.json").exists():
        problems.append(f"found training_params.json; loralab reads {PARAMS_FILE} (rename it)")
    peft_data = None
    peft_config = None
    if (path / ADAPTER_FILE).exists():
        peft_data = _read_json(path / ADAPTER_FILE, problems)
        if peft_data is not None:
            peft_config = load_peft_config(peft_data, problems)
    init_value, init_data, before = overrides.get("init_adapter"), None, len(problems)
    if isinstance(init_value, str) and init_value:
        init_data = read_init_adapter(init_value, problems)
        if init_data is not None and "model_id" not in overrides and init_data.get("base_model_name_or_path"):
            overrides = {**overrides, "model_id": init_data["base_model_name_or_path"]}  # the base it names
    init_broken = len(problems) > before  # the method is not checked against a config that could not be read
    from loralab.tasks import TASKS

    def unknown_task(task) -> list[str]:
        return [] if task in TASKS else [f"'task' = {task!r} is unknown{suggest(task, TASKS)}; known: {', '.join(sorted(TASKS))}"]

    bad: set[str] = set()
    try:
        params = checked_parameters(overrides, source=str(params_path))
    except ConfigError as exc:
        problems.extend(exc.problems)
        # the rest of the parameters still meet the task's and the method's checks, with every key a problem
        # names back at its default; a line of theirs that names such a key is left out (it would be about a
        # value the user did not write), and the task's own check waits for a valid task and data folder
        bad = {m.group(1) for line in exc.problems if (m := _NAMED_KEY.search(line))}
        params = _checked_without(overrides, bad)
        if params is None:  # a problem line this reading did not place: the task and the model are still checked
            task, model_id = overrides.get("task"), overrides.get("model_id")
            problems += unknown_task(task) if isinstance(task, str) and "task" not in bad else []
            problems += check_model_id(model_id) if isinstance(model_id, str) and "model_id" not in bad else []
            raise ConfigError(problems, str(path)) from None
    model_problems = [] if "model_id" in bad else check_model_id(params.model_id)
    problems.extend(model_problems)
    model_known = "model_id" not in bad and not model_problems
    rest = [] if "task" in bad else unknown_task(params.task)
    if not rest and not bad & {"task", "data_dir", "eval_split", "holdout_fraction", "holdout_seed"}:
        rest = TASKS[params.task].check(params)
    from_folder = init_data is not None and params.init_adapter is not None  # the run trains the folder's adapter
    if from_folder:
        peft_data = init_adapter_config(init_data, peft_data, init_value, problems)
        with quiet_corda_config():  # peft: "corda_config ... ignored" without the corda init: as meant here
            peft_config = load_peft_config(peft_data, own := [])
        problems += [f"'init_adapter' = {init_value!r}: {line}" for line in own]
        init_broken |= bool(own)
        problems += init_adapter_base_problems(init_value, init_data, params.model_id) if "model_id" not in bad else []
        if params.init is not None:
            problems.append(f"'init' = {params.init!r} with 'init_adapter' = {init_value!r}: two initialisations (the "
                            "folder's weights are the init); set one of them")
        wanted, kind = init_data.get("task_type"), getattr(TASKS.get(params.task), "kind", None)
        if wanted in TASK_TYPES.values() and TASK_TYPES.get(kind, wanted) != wanted:
            problems.append(f"'init_adapter' = {init_value!r} is a {wanted} adapter and 'task' = {params.task!r} trains "
                            f"a {TASK_TYPES[kind]} model: its weights (and head) belong to another model class")
    if not init_broken and not any(p.startswith("adapter_config.json") for p in problems):
        from loralab.methods import choose_method  # the registry knows which parts compose

        chosen = named_config(peft_config) if from_folder else peft_config
        checked = dataclasses.replace(params, init=None) if from_folder else params  # its 'init': refused above
        try:
            conflicts = choose_method(chosen, checked).conflicts(chosen, checked)
        except ConfigError as exc:
            conflicts = exc.problems
        rest += conflicts
        # the model's own checks, where the method composes and the model, task and starting adapter are sound
        if peft_config is not None and model_known and params.task in TASKS and "task" not in bad and not conflicts \
                and not any(p.startswith("'init_adapter'") for p in problems):
            rest += skeleton_problems(peft_config, checked, TASKS[params.task])
    named = re.compile(r"(?<![\w.])'?(" + "|".join(map(re.escape, sorted(bad))) + r")\b") if bad else None
    problems.extend(line for line in rest if named is None or not named.search(line))
    if problems:
        raise ConfigError(problems, str(path))
    return Experiment(
        path=path,
        name=experiment_name(path),
        params=params,
        peft_config=peft_config,
        train_params_sha=sha256_json(hashed_parameters(params)),
        peft_config_sha=sha256_json(peft_data) if peft_data is not None else None,
    )
