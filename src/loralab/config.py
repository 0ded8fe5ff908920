"""Training parameters: the one place where defaults live, and the checks made at the edge (the ``speed`` key's
settings: ``loralab.speed_settings``, checked from here).

An experiment's ``training_parameters.json`` holds only what differs from these defaults
(seed 004's format). Nested dicts (``calibration``, ``generation``, ``eval_options``) merge key by
key, so overriding one calibration field never drops the others. Every problem in a config is
reported at once, naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loralab import trackers
from loralab.speed_settings import Speed, _speed_defaults

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
CALIBRATION_SAMPLING = ("random", "first")
LOSS_NORMALIZATIONS = ("tokens", "samples")


class ConfigError(ValueError):
    """Raised with every problem of a configuration; ``problems`` lists them one per line."""

    def __init__(self, problems: list[str], source: str = "configuration"):
        self.problems = list(problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


def _calibration_defaults() -> dict[str, Any]:
    return {
        # None: sample from the task's own training split (seed 000: 256 random task samples).
        "dataset": None,
        "num_samples": 256,
        "seed": 0,
        # "random" (seed 000's README) or "first" (what seed 000's code actually did).
        "sampling": "random",
        "batch_size": 8,
        # where CorDA sources disagree (loralab.decomposition.corda.DEFAULTS): normalisation,
        # scaling, cov_dtype, ...; {} keeps the official code's choices
        "corda_options": {},
        # named calibration sets (seed 001): prompt format and sequence length
        "format": "llama2-chat",
        "seqlen": 2048,
    }


def _generation_defaults() -> dict[str, Any]:
    # None: the evaluation's source protocol (e.g. GSM8K 1,024 new tokens, commonsense 32); an
    # explicit value always wins over it (loralab.tasks.evaluations.generation_settings).
    return {"max_new_tokens": None, "batch_size": 16, "temperature": None, "top_p": None, "n_samples": None,
            "backend": "auto"}


@dataclass
class TrainingParameters:
    """Everything that is not the adapter: model, data, optimisation, evaluation."""

    model_id: str = "packaged:minilm-l6"
    """Hub id, local folder, a .gguf file, or ``packaged:minilm-l6`` / ``packaged:smollm2-135m``."""
    task: str = "glue/rte"
    """Training task, e.g. ``glue/rte``; ``loralab tasks`` lists them."""
    data_dir: str | None = None
    """Local data folder (GLUE TSV layout etc.); None: $LORALAB_DATA_DIR, else the hub."""
    num_epochs: float = 3
    max_steps: int | None = None
    """Optimizer steps; overrides num_epochs when set."""
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 4e-5
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    """torch AdamW's default, which seed 000's GLUE script used."""
    max_grad_norm: float = 0.0
    """0 disables clipping (seed 000 did not clip)."""
    loss_normalization: str = "tokens"
    """How the optimizer batch's loss is averaged, exactly, whatever the micro-batch:
    ``tokens``: sum of every labelled token's loss / number of labelled tokens in the optimizer
    batch (transformers >= 4.46); ``samples``: mean over samples of each sample's token mean (what
    a per-device batch of 1 computed in older transformers). Equal for classification."""
    checkpoint_steps: int | None = None
    """Write a checkpoint every N optimizer steps (None: every 10 % of the run; 0: only on
    SIGINT/SIGTERM). ``loralab run DIR --resume`` continues the latest one."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    max_length: int = 128
    pad_to_max_length: bool = False
    """True pads every batch to max_length (seed 000 parity); False pads dynamically."""
    seed: int = 0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    eval_split: str = "dev"
    """GLUE: ``dev`` (the task's dev split) or ``holdout`` (a fixed ``holdout_fraction`` of train,
    drawn with ``holdout_seed``, left out of training: for choosing hyper-parameters without dev)."""
    holdout_fraction: float = 0.1
    holdout_seed: int = 0
    eval_steps: int | None = None
    """Evaluate every N optimizer steps (None: only at the end)."""
    eval_batch_size: int = 64
    logging_steps: int = 10
    report_to: list[str] | str = field(default_factory=list)
    """Where training curves also go, as in transformers' TrainingArguments: a list of
    ``tensorboard``, ``wandb`` (or one name); ``"none"`` / ``[]`` (default): nowhere but stderr and
    the result. Each needs its package (``pip install tensorboard`` / ``wandb``); see
    ``loralab.trackers``."""
    logging_dir: str | None = None
    """TensorBoard's folder; None: ``tensorboard/`` inside the run's output folder."""
    wandb_project: str | None = None
    """W&B project; None: $WANDB_PROJECT, else ``loralab``."""
    dtype: str = "float32"
    """Base-model dtype; adapter weights stay float32."""
    optimizer: str = "adamw"
    """``adamw``, ``lorafa`` (peft's LoRA-FA optimizer) or ``loraplus`` (peft's LoRA+ optimizer)."""
    init: str | None = None
    """Inits peft lacks: milora, svd_lorafa (seed 003 as written), svd_lorafa_corrected, lorafa_qr."""
    init_adapter: str | None = None
    """A local peft adapter folder (``adapter_config.json`` + weights) whose weights start the adapter in place of
    the method's init, which does not run (no calibration, no SVD): ``loralab decompose --save-path DIR``'s
    ``DIR/adapter`` (seed 001's step 2), a downloaded decomposition's adapter, or any saved adapter to go on
    training (a path as ``model_id``'s: relative to the working folder). Its adapter_config.json is the adapter's
    config: the experiment's may be left out; where given, a key it sets (not null) wins if it leaves the weights'
    meaning alone (``lora_dropout``), and one that shapes or scales them (``r``, ``lora_alpha``, ``target_modules``,
    ``use_dora``, ...) is refused where it differs from the folder's, naming both values; an init
    (``init_lora_weights``, ``init``) is refused. Unset
    ``model_id`` defaults to the adapter's ``base_model_name_or_path``; a CorDA adapter (its config carries
    ``corda_config``) trains on its residual model only (a folder marked ``decompose.json``), and that model only
    with such an adapter. The record's ``run_info.init_adapter`` names the folder and its weights' sha256."""
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    """Options of the optimizer part (``loralab.methods.parts``): ``betas`` (default [0.9, 0.999]),
    ``eps`` (1e-8), ``no_decay`` (``["bias"]``, ``["norm"]`` or both: parameters left out of weight
    decay; default none) for every part; LoRA+ adds ``loraplus_lr_ratio`` (16) and
    ``loraplus_lr_embedding`` (1e-6). Unknown names are reported with the part's allowed ones."""
    quantization: str | None = None
    """``nf4``: base in 4-bit NormalFloat (QLoRA, bitsandbytes); ``fp8``: float8 e4m3 (methods/fp8base.py); None: float."""
    magnitude_only_modules: list[str] = field(default_factory=list)
    """DoRA modules whose magnitude alone trains (seed 002's Wdecompose_target_modules)."""
    calibration: dict[str, Any] = field(default_factory=_calibration_defaults)
    """Data-driven inits (CorDA): dataset, num_samples, seed, sampling, batch_size."""
    eval_tasks: list[str] | None = None
    """Causal LMs: evaluations to run after training; null (default): the task's own default
    evaluations; ``[]``: none (the run trains, saves and records empty eval metrics)."""
    generation: dict[str, Any] = field(default_factory=_generation_defaults)
    eval_options: dict[str, Any] = field(default_factory=dict)
    """Options passed to the evaluations (see ``loralab.tasks.evaluations``)."""
    speed: dict[str, Any] = field(default_factory=_speed_defaults)
    """``Speed``'s keys (its field comments: what each does, what "auto" means per device and model, decided
    by ``Speed.resolve``). An explicit value always wins over "auto"."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


NESTED = {"calibration": _calibration_defaults, "generation": _generation_defaults, "speed": _speed_defaults}


def default_parameters() -> dict[str, Any]:
    return TrainingParameters().to_dict()


def suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def merge_parameters(overrides: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Defaults updated by ``overrides``; nested dicts merge key by key. Returns (merged, problems)."""
    merged = default_parameters()
    problems = []
    for key, value in overrides.items():
        if key not in merged:
            problems.append(f"unknown key '{key}'{suggest(key, merged)}; valid keys: {', '.join(sorted(merged))}")
            continue
        if key in NESTED and isinstance(value, dict):
            allowed = NESTED[key]()
            for sub, sub_value in value.items():
                if sub not in allowed:
                    problems.append(f"unknown key '{key}.{sub}'{suggest(sub, allowed)}; valid keys: {', '.join(sorted(allowed))}")
                else:
                    merged[key][sub] = sub_value
        else:
            merged[key] = value
    return merged, problems


def _type_ok(value, annotation: str) -> bool:
    if value is None:
        return "None" in annotation
    if " | " in annotation:
        return any(_type_ok(value, part) for part in annotation.split(" | ") if part != "None")
    if "bool" in annotation:
        return isinstance(value, bool)
    if annotation.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation.startswith("float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation.startswith("str"):
        return isinstance(value, str)
    if annotation.startswith("list"):
        return isinstance(value, list)
    if annotation.startswith("dict"):
        return isinstance(value, dict)
    return True


def not_allowed(values: dict[str, Any], name: str, allowed) -> list[str]:
    """``["'<name>' = <value> is not allowed (did you mean ...); allowed: a, b"]`` when
    ``values[name]`` is not in ``allowed`` (a sequence; None shows as None), else ``[]``."""
    if values[name] in allowed:
        return []
    shown = ", ".join(str(a) for a in allowed)
    hint = suggest(values[name], [a for a in allowed if a]) if isinstance(values[name], str) else ""
    return [f"'{name}' = {values[name]!r} is not allowed{hint}; allowed: {shown}"]


def triton_off_cuda(device: str, speed: Any, device_setting: str = "'device'") -> list[str]:
    """An explicit Triton kernel (``speed.fp8_quantize_kernel``, ``speed.fp8_refresh_kernel``) where the run will have
    no CUDA (``device`` "cpu", or "auto" on a machine without it): one problem line per such key, naming it, the
    device (as ``device_setting``: the training parameter, or a command's flag) and the way out; [] where CUDA runs
    it, or Triton's CPU interpreter (``TRITON_INTERPRET=1``, the tests'). ``loralab run`` refuses these before
    anything is built; ``loralab bench`` before its first row."""
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return []
    where = "" if device == "cpu" else ", which finds none here"
    return [f"'speed.{key}' = 'triton' runs on CUDA and {device_setting} = {device!r}{where}: set it to {other!r} (or run "
            "with TRITON_INTERPRET=1, Triton's slow CPU interpreter)"
            for key, other in (("fp8_quantize_kernel", "torch"), ("fp8_refresh_kernel", "auto"))
            if isinstance(speed, dict) and speed.get(key) == "triton"]


def check_parameters(values: dict[str, Any], checks: Sequence[Callable[[dict], list[str]]] = ()) -> list[str]:
    """Every type and range problem of a merged parameter dict, one line each: the type problems, then the value
    checks here, then ``checks``: functions of the merged dict returning problems, by which a floor above adds what
    needs its registries (``loralab.experiment``: 'init', 'optimizer', 'calibration.corda_options'). A key of the
    wrong type is checked no further: the value checks see its default there, and a line of theirs that names it
    (a check across keys) is left out, so every line is about what the user wrote."""
    wrong = [f for f in dataclasses.fields(TrainingParameters) if not _type_ok(values[f.name], str(f.type))]
    typed = [f"'{f.name}' = {values[f.name]!r} has the wrong type; expected {f.type}" for f in wrong]
    if typed:
        wrong = [f.name for f in wrong]
        defaults = default_parameters()
        values = {**values, **{name: defaults[name] for name in wrong}}
        named = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, wrong)) + r")\b")  # not 'calibration.<key>'
        return typed + [line for line in _value_problems(values, checks) if not named.search(line)]
    return _value_problems(values, checks)


def _value_problems(values: dict[str, Any], checks: Sequence[Callable[[dict], list[str]]]) -> list[str]:
    """``check_parameters``'s value checks of a dict whose every value has its field's type."""
    problems = []

    def positive(name, allow_none=False):
        if not (values[name] is None and allow_none) and (values[name] is None or values[name] <= 0):
            problems.append(f"'{name}' = {values[name]!r} must be > 0")

    for name in ("batch_size", "gradient_accumulation_steps", "learning_rate", "max_length", "eval_batch_size", "logging_steps",
                 "max_steps", "max_train_samples", "max_eval_samples", "eval_steps"):  # the last four may be null
        positive(name, allow_none=name in ("max_steps", "max_train_samples", "max_eval_samples", "eval_steps"))
    if values["num_epochs"] <= 0 and values["max_steps"] is None:
        problems.append(f"'num_epochs' = {values['num_epochs']!r} must be > 0 unless max_steps is set")
    if not 0 <= values["warmup_ratio"] < 1:
        problems.append(f"'warmup_ratio' = {values['warmup_ratio']!r} must be in [0, 1)")
    problems += [f"'{k}' = {values[k]!r} must be >= 0{why}" for k, why in (("weight_decay", ""),
                 ("max_grad_norm", " (0 disables clipping)")) if values[k] < 0]
    for name, allowed in (("dtype", DTYPES), ("lr_scheduler", SCHEDULERS), ("device", ("auto", "cpu", "cuda"))):
        problems.extend(not_allowed(values, name, allowed))
    cal = values["calibration"]
    problems += [f"'calibration.{key}' = {cal[key]!r} must be a positive integer" for key in ("num_samples", "batch_size")
                 if not (isinstance(cal[key], int) and cal[key] > 0)]
    problems += [f"'calibration.{key}' = {cal[key]!r} is not allowed; allowed: {', '.join(allowed)}" for key, allowed
                 in (("sampling", CALIBRATION_SAMPLING), ("format", ("llama2-chat", "training"))) if cal[key] not in allowed]
    problems += Speed.problems(values["speed"]) + triton_off_cuda(values["device"], values["speed"])
    problems.extend(not_allowed(values, "loss_normalization", LOSS_NORMALIZATIONS))
    if values["checkpoint_steps"] is not None and values["checkpoint_steps"] < 0:
        problems.append(f"'checkpoint_steps' = {values['checkpoint_steps']!r} must be >= 0 (0: only on SIGINT/SIGTERM; null: every 10 % of the run)")
    if values["init_adapter"] == "":  # its folder and config: loralab.experiment, which reads them
        problems.append("'init_adapter' = '' must name a peft adapter folder, or be null (the method's own init)")
    if values["keep_checkpoints"] < 1:
        problems.append(f"'keep_checkpoints' = {values['keep_checkpoints']!r} must be >= 1")
    if not isinstance(cal["corda_options"], dict):  # its keys: loralab.experiment checks them
        problems.append(f"'calibration.corda_options' = {cal['corda_options']!r} must be a JSON object")
    problems.extend(trackers.report_to_problems(values["report_to"]))
    gen = values["generation"]  # its other values: loralab.experiment (tasks.generation.RULES)
    if gen["max_new_tokens"] is not None and not (isinstance(gen["max_new_tokens"], int) and gen["max_new_tokens"] > 0):
        problems.append(f"'generation.max_new_tokens' = {gen['max_new_tokens']!r} must be a positive integer")
    if not (isinstance(cal["seqlen"], int) and not isinstance(cal["seqlen"], bool) and cal["seqlen"] > 0):
        problems.append(f"'calibration.seqlen' = {cal['seqlen']!r} must be a positive integer (tokens per calibration sample)")
    for check in checks:
        problems.extend(check(values))
    return problems


def build_parameters(overrides: dict[str, Any], source: str = "training_parameters.json",
                     checks: Sequence[Callable[[dict], list[str]]] = ()) -> TrainingParameters:
    """Merge, check and build; raises ConfigError naming every problem. The values that only the
    registries above config know ('init', 'optimizer', 'calibration.corda_options') are checked
    by the ``checks`` given (``check_parameters``): ``loralab.experiment.checked_parameters``
    passes them, as reading an experiment does."""
    merged, problems = merge_parameters(overrides)
    problems += check_parameters(merged, checks)  # an unknown key is left out of merged: the rest is still checked
    if problems:
        raise ConfigError(problems, source)
    merged["report_to"] = trackers.backends(merged["report_to"])  # always a list inside
    if merged["data_dir"] is None and os.environ.get("LORALAB_DATA_DIR"):
        merged["data_dir"] = os.environ["LORALAB_DATA_DIR"]
    return TrainingParameters(**merged)
