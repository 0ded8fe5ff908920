"""Training parameters: the one place where defaults live, and the checks made at the edge.

An experiment's ``training_parameters.json`` holds only what differs from these defaults
(seed 004's format). Nested dicts (``calibration``, ``generation``, ``eval_options``) merge key by
key, so overriding one calibration field never drops the others. Every problem in a config is
reported at once, naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loralab import trackers

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
        # sampling: "random" (seed 000's README) or "first" (what seed 000's code actually did).
        "dataset": None, "num_samples": 256, "seed": 0, "sampling": "random", "batch_size": 8,
        # where CorDA sources disagree (loralab.decomposition.corda.DEFAULTS): normalisation,
        # scaling, cov_dtype, ...; {} keeps the official code's choices
        "corda_options": {},
        "format": "llama2-chat", "seqlen": 2048,  # named calibration sets (seed 001): prompt format and sequence length
    }


def _generation_defaults() -> dict[str, Any]:
    # None: the evaluation's source protocol (e.g. GSM8K 1,024 new tokens, commonsense 32); an
    # explicit value always wins over it (loralab.tasks.evaluations.generation_settings).
    return {"max_new_tokens": None, "batch_size": 16, "temperature": None, "top_p": None, "n_samples": None,
            "backend": "auto"}


GRAD_REDUCE = ("ddp", "after_backward")  # speed.grad_reduce's values (see Speed)
FP8_QUANTIZE_KERNELS = ("torch", "triton")  # speed.fp8_quantize_kernel's: torch ops (speed/fp8.py) or speed/fp8_kernels
FUSED_AND = ("'speed.{key}' = true with 'speed.fused_lora' = true: both rewrite LoRA's forward; "
             "set {key} to \"auto\" or false, or fused_lora to false")  # key: lora_scale_at_rank, lora_shared_input
FP8_FAST_ACCUM = ("none", "forward", "all")  # speed.fp8_fast_accum's: which FP8 GEMMs accumulate fast (speed/fp8.py)
FP8_ONLY_SPEED = ("fp8_transpose_cache", "fp8_quantize_kernel", "fp8_fast_accum", "fp8_fused_qkv")  # on an FP8 base only


ACTIVATION_BUDGET = 0.8  # speed.activation_memory_budget "auto" where layers compile: 8B shape, H100, 2 x 512 rows:
# 0.983x tokens/s, 1.52 GiB less, so bf16 LoRA's probe takes micro-batch 2 (results/bench-actbudget-h100)
LOSS_CHUNK = 1024
"""``speed.loss_chunk_size`` "auto": tokens per loss chunk, unless the probe shrinks it (run/probe.py)."""


@dataclass
class Speed:
    """How a run computes its steps (``training_parameters.json``'s ``speed``): defaults, checks and
    what ``"auto"`` means per device, task kind and base dtype (``resolve``), in one place. An
    explicit value always wins; the resolved values go into the record's ``train_info.speed``.
    None of them changes the optimizer batch; the exact rewrites do not change the numbers either."""

    fast_dora: bool = True  # exact: peft's DoRA forward swapped for speed/fast_dora (same adapter format)
    chunked_loss: bool = True  # exact: fused LM head + chunked cross-entropy, no full logits (speed/losses)
    cuda_graphs: bool | str = "auto"  # exact; auto: on CUDA (no kernel-launch overhead; widths bucketed), off on CPU
    fused_lora: bool = False  # exact, but 2.6 % slower than compiled peft layers on Llama-3-8B (H100)
    autocast: str | None = "auto"  # auto: the base dtype on CUDA with a bf16/fp16 base (adapters stay fp32), else null
    compile: bool | str = "auto"  # auto: CUDA causal LMs (regional, +29 % on Llama-3-8B); classification is launch-bound
    packing: bool | str = "auto"  # auto: causal LMs (exact per-token weights, no pad tokens)
    micro_batch: int | str | None = "auto"  # samples (packed: rows) per forward; auto: probed on CUDA, batch_size on CPU
    group_by_length: bool = False  # changes which samples share an optimizer batch: opt in
    memory_fraction: float = field(default=0.25, metadata={"added": True})  # auto micro-batch: the probed peak's cap, share of
    # the GPU; 0.25 = 35.1 GiB of an H200, under the tuned peer's 37.7 GiB at its best (8B LoRA, 8 x 512, issue 22)
    grad_reduce: str = field(default="ddp", metadata={"added": True})  # more than one DDP process: "ddp" (DDP's
    # bucketed all-reduce during the backward; CUDA graphs off) or "after_backward" (one summed all-reduce of the
    # gradients after the last micro-batch, outside any capture, so CUDA graphs stay on: run/reduce.py, issue 23)
    fp8_transpose_cache: float | str = field(default="auto", metadata={"added": True, "old_defaults": (0.0,)})  # FP8
    # base: share of its weight bytes kept column-major for the backward, largest first (speed/fp8.py cache_transposes);
    # auto: what the probed micro-batch leaves of the budget (run/spare_memory.py; 1.055x FP8 LoRA, all cached, H100)
    fp8_quantize_kernel: str = field(default="torch", metadata={"added": True})  # FP8 base: "torch" ops or speed/fp8_kernels
    fp8_fast_accum: str = field(default="all", metadata={"added": True})  # FP8 base: GEMMs without Hopper's float32 promotion
    # (speed/fp8.py use_fast_accum; not exact: <= 3.3e-3 from the rule): 1.053x FP8 LoRA on an H100 (results/bench-speedab-h100)
    fp8_fused_qkv: bool = field(default=True, metadata={"added": True})  # FP8 base: q/k/v as one GEMM (speed/fp8_qkv.py;
    # not bitwise: the input gradient's rows quantise as one)
    lora_scale_at_rank: bool | str = field(default="auto", metadata={"added": True, "old_defaults": (False,)})
    # exact: B(s·Ax) for B(Ax)·s (speed/rank_scaling); auto: on unless fused_lora is, or the adapters compute in
    # float16 (where it would take peft's forward); 1.028x, 1.027x FP8 LoRA at the 8B shape: results/bench-fair-h100
    lora_shared_input: bool | str = field(default="auto", metadata={"added": True, "old_defaults": (False,)})  # one GEMM
    # for the LoRA/fast DoRA A's of the projections reading one input (q/k/v, gate/up: speed/shared_input; not bitwise: dx's terms
    # sum in another order); auto: on CUDA for causal LMs unless fused_lora is
    cudnn_attention: bool | str = field(default="auto", metadata={"added": True})  # causal batches without a mask, of a length
    # divisible by 128: cuDNN's SDPA kernel first (speed/attention.py: why, where not); auto: on compute capability 9.0
    dora_norm_per_step: bool = field(default=True, metadata={"added": True})  # fast DoRA's weight norm once per
    # optimizer step, not per micro-batch (speed/fast_dora refresh_dora_norms; bitwise without autocast, float32 products
    # under it; off under FSDP): 1.119x bf16, 1.035x FP8-base DoRA at the 8B shape, results/bench-dora-h100
    micro_batch_probe: dict | None = field(default=None, metadata={"code_only": True})  # what make_step chose and why
    fp8_transposes_cached: dict | None = field(default=None, metadata={"code_only": True})  # what prepare_model cached
    lora_scaled_at_rank: dict | None = field(default=None, metadata={"code_only": True})  # layers it took (of all)
    lora_shared_inputs: dict | None = field(default=None, metadata={"code_only": True})  # groups it made, their layers
    fp8_qkv_trios: dict | None = field(default=None, metadata={"code_only": True})  # q/k/v trios fp8_fused_qkv fused
    compile_backend: str = field(default="inductor", metadata={"code_only": True})  # set by code, not by experiments
    activation_memory_budget: float | str = field(default="auto", metadata={"added": True})  # compiled layers: torch's
    # memory-budget partitioner (speed/step.py; 1.0: its min-cut); auto: ACTIVATION_BUDGET; 1.0 where no layer compiles
    loss_chunk_size: int | str = field(default="auto", metadata={"added": True, "old_defaults": (LOSS_CHUNK,)})
    # tokens per chunk of the fused LM-head loss (speed/losses; exact at any size), ~10 bytes a token and word on the
    # step's peak; auto: LOSS_CHUNK, or 128 where the probe finds a micro-batch fits only so (run/probe.py)

    @classmethod
    def experiment_keys(cls) -> list[str]:
        """The keys an experiment's ``speed`` holds (every field but the code-only ones)."""
        return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("code_only")]

    @staticmethod
    def problems(speed: dict[str, Any]) -> list[str]:
        """Every problem of an experiment's ``speed`` dict (all keys present), one line each."""
        types = {f.name: f.type for f in dataclasses.fields(Speed) if not f.metadata.get("code_only")}
        problems = [f"'speed.{k}' = {speed[k]!r} must be true or false"
                    for k, t in types.items() if t == "bool" and not isinstance(speed[k], bool)]
        problems += [f"'speed.{k}' = {speed[k]!r} must be true, false or \"auto\"" for k, t in types.items()
                     if t == "bool | str" and not (isinstance(speed[k], bool) or speed[k] == "auto")]
        if speed["autocast"] not in (None, "auto", "bfloat16", "float16"):
            problems.append(f"'speed.autocast' = {speed['autocast']!r} is not allowed; allowed: auto, null, bfloat16, float16")
        for k, auto in (("memory_fraction", ""), ("activation_memory_budget", '"auto" or ')):
            if not (type(speed[k]) in (int, float) and 0 < speed[k] <= 1 or auto and speed[k] == "auto"):
                problems.append(f"'speed.{k}' = {speed[k]!r} must be {auto}a number in (0, 1]")
        if speed["compile"] is False and speed["activation_memory_budget"] not in (1, "auto"):
            problems.append(f"'speed.activation_memory_budget' = {speed['activation_memory_budget']!r} with 'speed.compile' "
                            "= false: the budget acts on compiled layers; set compile to true, or the budget to \"auto\"")
        if not (type(cache := speed["fp8_transpose_cache"]) in (int, float) and 0 <= cache <= 1 or cache == "auto"):
            problems.append(f"'speed.fp8_transpose_cache' = {cache!r} must be \"auto\" or a number in [0, 1] (of the FP8 bytes)")
        for key, allowed in (("grad_reduce", GRAD_REDUCE), ("fp8_quantize_kernel", FP8_QUANTIZE_KERNELS), ("fp8_fast_accum", FP8_FAST_ACCUM)):
            if speed[key] not in allowed:
                problems.append(f"'speed.{key}' = {speed[key]!r} is not allowed; allowed: {', '.join(allowed)}")
        problems += [FUSED_AND.format(key=k) for k in ("lora_scale_at_rank", "lora_shared_input")
                     if speed["fused_lora"] is True and speed[k] is True]
        for k, unit in (("loss_chunk_size", " (tokens per chunk)"), ("micro_batch", "")):
            if not (speed[k] == "auto" or (isinstance(speed[k], int) and not isinstance(speed[k], bool) and speed[k] > 0)):
                problems.append(f"'speed.{k}' = {speed[k]!r} must be \"auto\" or a positive integer{unit}")
        return problems

    def resolve(self, *, device_type: str, kind: str, base_dtype: str, cudnn_pays: bool = False) -> Speed:
        """A copy with every ``"auto"`` replaced for this run: ``device_type`` ``cuda``/``cpu``, task
        ``kind`` ``causal_lm``/``seq_cls``, the experiment's ``dtype``, ``cudnn_pays`` (the device's
        ``speed.attention.cudnn_attention_pays``). ``micro_batch`` stays "auto" on CUDA, and with
        it a causal LM's ``loss_chunk_size`` and ``fp8_transpose_cache`` "auto": only a memory probe with the built
        model settles them (``loralab.run.step.make_step``)."""
        cuda, causal = device_type == "cuda", kind == "causal_lm"
        auto = {"cuda_graphs": cuda, "autocast": base_dtype if cuda and base_dtype in ("bfloat16", "float16") else None,
                "compile": cuda and causal, "packing": causal, **({} if cuda else {"micro_batch": None}),
                "fp8_transpose_cache": "auto" if cuda and self.micro_batch == "auto" else 0.0}  # no probe: nothing spare
        out = dataclasses.replace(self, **{k: v for k, v in auto.items() if getattr(self, k) == "auto"})
        out.cuda_graphs = bool(out.cuda_graphs and cuda)  # an explicit true on CPU: nothing to capture
        out.cudnn_attention = bool(cuda and causal and (out.cudnn_attention is True or out.cudnn_attention == "auto" and cudnn_pays))
        if out.loss_chunk_size == "auto" and not (cuda and causal and out.chunked_loss and out.micro_batch == "auto"):
            out.loss_chunk_size = LOSS_CHUNK  # else the probe settles it (loralab.run.step.make_step)
        if out.activation_memory_budget == "auto" or not out.compile:  # no compiled layer: nothing to partition
            out.activation_memory_budget = ACTIVATION_BUDGET if out.compile else 1.0
        if out.lora_scale_at_rank == "auto":
            out.lora_scale_at_rank = out.fused_lora is not True and "float16" not in (base_dtype, out.autocast)
        if out.lora_shared_input == "auto":
            out.lora_shared_input = cuda and causal and out.fused_lora is not True
        return out

    def record(self) -> dict[str, Any]:
        """The experiment keys and values as the record holds them, plus what code set (``micro_batch_probe``,
        ``fp8_transposes_cached``, ``lora_scaled_at_rank``, ``lora_shared_inputs``) once set."""
        found = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.type == "dict | None" and getattr(self, f.name)}
        return {**{k: getattr(self, k) for k in self.experiment_keys()}, **found}


def _speed_defaults() -> dict[str, Any]:
    return Speed().record()


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


def check_parameters(values: dict[str, Any], checks: Sequence[Callable[[dict], list[str]]] = ()) -> list[str]:
    """Every type and range problem of a merged parameter dict, one line each. Type problems
    alone when there are any; otherwise the value checks here, then ``checks``: functions of the
    merged dict returning problems, by which a floor above adds what needs its registries
    (``loralab.experiment``: 'init', 'optimizer', 'calibration.corda_options')."""
    problems = []
    for f in dataclasses.fields(TrainingParameters):
        value = values[f.name]
        if not _type_ok(value, str(f.type)):
            problems.append(f"'{f.name}' = {value!r} has the wrong type; expected {f.type}")
    if problems:
        return problems

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
    problems += Speed.problems(values["speed"])
    problems.extend(not_allowed(values, "loss_normalization", LOSS_NORMALIZATIONS))
    if values["checkpoint_steps"] is not None and values["checkpoint_steps"] < 0:
        problems.append(f"'checkpoint_steps' = {values['checkpoint_steps']!r} must be >= 0 (0: only on SIGINT/SIGTERM; null: every 10 % of the run)")
    problems += [f"'keep_checkpoints' = {values['keep_checkpoints']!r} must be >= 1"] if values["keep_checkpoints"] < 1 else []
    if not isinstance(cal["corda_options"], dict):  # its keys: loralab.experiment checks them
        problems.append(f"'calibration.corda_options' = {cal['corda_options']!r} must be a JSON object")
    problems.extend(trackers.report_to_problems(values["report_to"]))
    gen = values["generation"]
    if gen["max_new_tokens"] is not None and not (isinstance(gen["max_new_tokens"], int) and gen["max_new_tokens"] > 0):
        problems.append(f"'generation.max_new_tokens' = {gen['max_new_tokens']!r} must be a positive integer")
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
    if not problems:
        problems = check_parameters(merged, checks)
    if problems:
        raise ConfigError(problems, source)
    merged["report_to"] = trackers.backends(merged["report_to"])  # always a list inside
    if merged["data_dir"] is None and os.environ.get("LORALAB_DATA_DIR"):
        merged["data_dir"] = os.environ["LORALAB_DATA_DIR"]
    return TrainingParameters(**merged)
