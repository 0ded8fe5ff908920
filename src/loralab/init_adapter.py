"""Training from a saved adapter: training_parameters ``init_adapter`` (seed 001's step 2, ``sh
tools/train_CorDA.sh {path_to_decomposed_model}``), read and checked before any model loads, then loaded.

The folder (``adapter_config.json`` + ``adapter_model.safetensors``, as peft saves one) is the adapter: its
config is the config the run trains with (``init_adapter_config``; the experiment's own adapter_config.json
may add only what leaves the weights' meaning alone, e.g. ``lora_dropout``, and is refused where it sets a key
that shapes them to another value, naming both), built with a plain init and then overwritten by the folder's
tensors (``load_weights``), so no init runs (no calibration, no SVD). The base is the one the adapter belongs
to (``init_adapter_base_problems``: a CorDA adapter, whose config carries ``corda_config``, on the residual
model ``loralab decompose --save-path`` marked, as ``merge.residual_base_problem`` rules). The trained adapter
is saved as any LoRA run's: plain peft, on the same base. The record names the folder and its weights' sha256
(``provenance``), and a CorDA folder's run is recorded as CorDA's (``named_config``), with its decomposition's
calibration as the run's (``calibration_provenance``: meta_info.dataset.calibration, checked against the run's own
evaluations and warned of, as an in-process calibration is).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from loralab.config import ConfigError, suggest
from loralab.results import sha256_file

ADAPTER_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

SHAPING_KEYS = ("peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora",
                "use_rslora", "layers_to_transform", "layers_pattern", "exclude_modules", "fan_in_fan_out", "bias",
                "lora_bias", "modules_to_save", "task_type", "corda_config")
"""adapter_config.json keys that shape an ``init_adapter``'s tensors or scale what they compute (and CorDA's record
of what made them): the experiment's adapter_config.json may not set one to another value than the folder's."""
FOLDER_ONLY = ("base_model_name_or_path", "revision", "inference_mode", "init_lora_weights")
"""The folder's keys a run from it does not take: the base is ``model_id``, the run trains, the weights are the init."""
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


def read_init_adapter(value: str, problems: list[str]) -> dict | None:
    """The ``adapter_config.json`` data of the folder training_parameters ``init_adapter`` names (a path, ``~``
    expanded, relative to the working folder), or None with every reason in ``problems``: no such folder, no
    adapter_config.json (a hint where its ``adapter/`` subfolder has one), no weights file, not JSON, not a LoRA
    adapter, or an init that loading would run again (``init_lora_weights`` other than true, false, "gaussian")."""
    folder, where = Path(value).expanduser(), f"'init_adapter' = {value!r}"
    if not folder.is_dir():
        problems.append(f"{where}: no such folder (a peft adapter folder: {ADAPTER_FILE} + adapter_model.safetensors)")
        return None
    if not (folder / ADAPTER_FILE).is_file():
        sub = " (its subfolder adapter/ is one: loralab decompose --save-path DIR writes DIR/adapter)" \
            if (folder / "adapter" / ADAPTER_FILE).is_file() else ""
        problems.append(f"{where} holds no {ADAPTER_FILE}: not a peft adapter folder{sub}")
        return None
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        problems.append(f"{where} holds no adapter_model.safetensors (nor .bin): no weights to start from")
    try:
        data = json.loads((folder / ADAPTER_FILE).read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{where}: its {ADAPTER_FILE} is not readable JSON ({exc})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{where}: its {ADAPTER_FILE} must hold a JSON object, got {type(data).__name__}")
        return None
    if data.get("peft_type", "LORA") != "LORA":
        problems.append(f"{where} holds a {data.get('peft_type')!r} adapter; loralab's methods train LoRA adapters "
                        "(peft_type 'LORA')")
        return None
    init = data.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init == "gaussian"):
        problems.append(f"{where} records 'init_lora_weights' = {init!r}: loading it would run that init again on "
                        "'model_id' (peft does), not start from its weights; save the initial adapter with "
                        "init_lora_weights true beside the base it belongs to (loralab decompose --save-path does)")
        return None
    return data


AS_SETS = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform")
"""Name (or layer index) lists whose order means nothing: peft keeps target/exclude_modules as sets and saves them as
``list(set)``, whose order follows PYTHONHASHSEED."""


def _same(key: str, a, b) -> bool:
    if key in AS_SETS and isinstance(a, list | set) and isinstance(b, list | set):
        return set(a) == set(b)
    return a == b


def _mismatch(key: str, mine, theirs, value: str) -> str:
    """The problem line of a ``SHAPING_KEYS`` key the experiment's adapter_config.json sets to ``mine`` where the
    folder has ``theirs``. Two name lists (``target_modules``, ``modules_to_save``: 7 names in different orders hide
    one typo) are told by their difference: the names only adapter_config.json has, each with the folder's closest
    name, and those only the folder has."""
    fix = f"leave '{key}' out of adapter_config.json (the folder's config is the adapter's) or set it to the folder's"
    if not (isinstance(mine, list | set | tuple) and isinstance(theirs, list | set | tuple)):
        return (f"adapter_config.json '{key}' = {mine!r} but the adapter in 'init_adapter' = {value!r} has '{key}' = "
                f"{theirs!r}, which its weights were made with: {fix}")
    ours, folder = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    said = ["only adapter_config.json names " + ", ".join(f"{n!r}{suggest(n, sorted(set(theirs)))}" for n in ours)] \
        if ours else []
    said += [f"only the folder names {', '.join(map(repr, folder))}"] if folder else []
    return (f"adapter_config.json '{key}' differs from the '{key}' of the adapter in 'init_adapter' = {value!r} "
            f"({len(set(theirs))} names, which its weights were made with): {'; '.join(said)}; {fix}")


def init_adapter_config(data: dict, own: dict | None, value: str, problems: list[str]) -> dict:
    """The adapter_config.json data a run from the ``init_adapter`` folder ``value`` trains with: the folder's
    ``data`` less ``FOLDER_ONLY``, ``init_lora_weights`` true (no init runs), and every key the experiment's
    own adapter_config.json (``own``, or None) sets (to anything but null: peft's "its default") laid over it. A
    ``SHAPING_KEYS`` key set to another value than the folder's (``r`` 8 where the folder has 4, even if 8 is peft's
    default), or an init (``init_lora_weights`` other than true), is a problem naming both values (two name lists:
    their difference, with "did you mean"). ``target_modules``
    "all-linear" is left to the weights' load (``load_weights``), which names any module that differs."""
    from peft import LoraConfig

    defaults = LoraConfig().to_dict()
    merged = {k: v for k, v in data.items() if k not in FOLDER_ONLY}
    for key, mine in (own or {}).items():
        if key in (*FOLDER_ONLY[:3], "peft_version") or key not in defaults or mine is None or mine is True and \
                key == "init_lora_weights":
            continue
        theirs = data.get(key, defaults[key])
        if key == "init_lora_weights":
            problems.append(f"'init_adapter' = {value!r} with adapter_config.json 'init_lora_weights' = {mine!r}: two "
                            "initialisations (the folder's weights are the init, and no other runs); remove "
                            "'init_lora_weights' (a CorDA adapter's corda_config records it as CorDA's)")
        elif key not in SHAPING_KEYS or key == "target_modules" and mine == "all-linear":  # all-linear: at the load
            merged[key] = mine
        elif not _same(key, mine, theirs):
            problems.append(_mismatch(key, mine, theirs, value))
    return {**merged, "init_lora_weights": True}


def named_config(cfg):
    """The adapter config the method registry names a run from ``init_adapter`` by (its record, its conflicts):
    ``init_lora_weights`` back to "corda" where the folder carries ``corda_config`` (CorDA's decomposition made
    the weights: recorded as corda_ipa / corda_kpa), else ``cfg`` itself; no init runs either way."""
    if getattr(cfg, "corda_config", None) is None:
        return cfg
    named = copy.deepcopy(cfg)
    named.init_lora_weights = "corda"
    return named


def init_adapter_base_problems(value: str, data: dict, model_id: str) -> list[str]:
    """The base rule of a run from the ``init_adapter`` folder ``value`` (its adapter_config ``data``) on
    ``model_id``, ``merge.residual_base_problem``'s: an adapter that carries ``corda_config`` trains on the
    residual model its decomposition saved (a folder marked ``decompose.json``) only, and such a model with such an
    adapter only (another adapter, a converted ``--to-lora`` one included, belongs to another base). One problem
    line naming both keys, or []."""
    from loralab.decomposition.build import RESIDUAL_MARKER
    from loralab.merge import residual_base_problem

    problem = residual_base_problem(Path(value).expanduser(), model_id, flag="'model_id'", named="'model_id'")
    if problem:
        return [f"'init_adapter' with 'model_id': {problem}"]
    if not data.get("corda_config") and (Path(model_id).expanduser() / RESIDUAL_MARKER).is_file():
        return [f"'init_adapter' with 'model_id': 'model_id' = {model_id!r} is a residual model ({RESIDUAL_MARKER}: "
                f"a decomposition took its adapter's part out of the weights) and the adapter in {value!r} carries "
                "no 'corda_config', so it was not made for it (a converted --to-lora adapter belongs to the original "
                "model); start from the residual's own adapter (DIR/adapter) or set 'model_id' to the adapter's base"]
    return []


def load_weights(peft_model, folder) -> None:
    """Copy the adapter weights of ``folder`` into ``peft_model`` (adapter ``default``, built with the folder's
    config and a plain init). The file must hold exactly the tensors the model's adapter saves
    (``get_peft_model_state_dict``: LoRA factors, DoRA magnitudes, ``modules_to_save`` copies), each of its shape;
    raises ConfigError naming the missing, unexpected and misshapen ones (e.g. an experiment's ``target_modules``
    "all-linear" where the folder adapted fewer layers)."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    folder = Path(folder).expanduser()  # as read_init_adapter read it: peft takes "~/..." for a hub id
    weights = load_peft_weights(str(folder), device="cpu")
    expected = get_peft_model_state_dict(peft_model)
    problems = [f"{what} {len(names)} tensor(s), e.g. {', '.join(names[:3])}" for what, names in (
        ("the model's adapter has, and the folder lacks,", sorted(set(expected) - set(weights))),
        ("the folder holds, and the model's adapter lacks,", sorted(set(weights) - set(expected)))) if names]
    problems += [f"{name}: {tuple(weights[name].shape)} in the folder, {tuple(t.shape)} in the model"
                 for name, t in expected.items() if name in weights and weights[name].shape != t.shape]
    if problems:
        raise ConfigError([f"'init_adapter' = {str(folder)!r} does not fit the adapter built from its config on "
                           f"this model: {p}" for p in problems], "init_adapter")
    set_peft_model_state_dict(peft_model, weights)


def provenance(folder, model_id: str) -> dict:
    """``run_info.init_adapter``: ``path`` (absolute), ``weights`` (the weight file's name) and its ``sha256``,
    ``config_sha256`` (the folder's adapter_config.json bytes), the ``base_model_name_or_path`` it records, and,
    where ``model_id`` is a decomposition's residual model, ``decomposition``: what its ``decompose.json`` says
    (model, rank, mode, calibration, seconds) and ``file``, its path. Raises OSError where a file cannot be read."""
    from loralab.decomposition.build import RESIDUAL_MARKER

    folder = Path(folder).expanduser().resolve()
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:  # gone since the experiment was read
        raise FileNotFoundError(f"{folder} holds no {' nor '.join(WEIGHT_FILES)} (any more)")
    config = json.loads((folder / ADAPTER_FILE).read_text())
    out = {"path": str(folder), "weights": weights.name, "sha256": sha256_file(weights),
           "config_sha256": sha256_file(folder / ADAPTER_FILE), "base_model_name_or_path": config.get("base_model_name_or_path")}
    marker = Path(model_id).expanduser() / RESIDUAL_MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        out["decomposition"] = {k: info[k] for k in ("model_id", "r", "mode", "calibration", "seconds") if k in info}
        out["decomposition"]["file"] = str(marker.resolve())
    return out


def calibration_provenance(source: dict | None, evaluations, data_dir, value: str) -> dict | None:
    """``meta_info.dataset.calibration`` of a run from the ``init_adapter`` folder ``value`` (``source``: its
    ``provenance``): the calibration its decomposition ran, as decompose.json records it (``source``: the file or
    ``hub:`` split, ``split``, ``official_split``, ``note``, ``name``, ``num_samples``, ``seed``, ``seqlen``, ...),
    with ``decomposition`` (that decompose.json's path) and, as an in-process calibration records its own
    (``MethodContext.calibration_provenance``), ``overlaps_evaluations``: those of ``evaluations`` (this run's names)
    that score that very text (``decomposition.overlap.evaluation_overlap`` under ``data_dir``; computed here, not
    taken from the decomposition, which knew other evaluations) and, when not empty, ``overlap_note``, also printed as
    a warning on stderr. None where the folder's base records no decomposition."""
    from loralab.decomposition.overlap import overlap_provenance

    decomposition = (source or {}).get("decomposition") or {}
    calibration = decomposition.get("calibration")
    if not isinstance(calibration, dict):
        return None
    kept = {k: v for k, v in calibration.items() if k not in ("overlaps_evaluations", "overlap_note")}
    return overlap_provenance({**kept, "decomposition": decomposition.get("file")}, evaluations, data_dir,
                              f"'init_adapter' = {value!r} (its decomposition calibrated on {calibration.get('name')!r})")
