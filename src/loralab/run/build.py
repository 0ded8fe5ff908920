"""Everything a run makes before its first step: model, tokenizer, task data, the method's adapter,
the optimizer (always the method's optimizer part) and the learning-rate schedule.

Method-specific checks that need the model's layer shapes run here again, before any training (reading the
experiment made them on the model's weightless skeleton where one could be built: ``experiment.skeleton_problems``); data
that cannot be read is bad input (``ConfigError``). A run from a saved adapter (``init_adapter``) builds
the adapter with the folder's config and a plain init, then writes the folder's tensors into it
(``loralab.init_adapter``). Then ``run.step.make_step`` turns the built model and optimizer into the
run's step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loralab import checkpoint, init_adapter, results
from loralab.config import ConfigError
from loralab.data import pad_id as _pad_id
from loralab.experiment import Experiment
from loralab.methods import choose_method
from loralab.methods.common import ResidualSaver, build_peft, lora_modules, name_problems, resolve_config
from loralab.methods.context import MethodContext
from loralab.models import load_model, load_tokenizer
from loralab.run.record import Lifecycle
from loralab.tasks import get_task


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def count_trainable(model) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def output_root() -> Path:
    """Where runs write adapters, checkpoints and logs: ``$LORALAB_OUTPUT_DIR``, default ``outputs``."""
    return Path(os.environ.get("LORALAB_OUTPUT_DIR", "outputs"))


def output_dir(exp: Experiment, created_at: str) -> Path:
    """``output_root()`` / ``<experiment name>--<results.stamp(created_at)>``."""
    return output_root() / f"{exp.name.replace('/', '--')}--{results.stamp(created_at)}"


def warmup_steps(ratio: float, total_steps: int) -> int:
    """Warm-up steps for ``warmup_ratio``: ``ceil(ratio * total_steps)``, as transformers'
    ``TrainingArguments.get_warmup_steps`` computes it (the Trainer the seeds' scripts ran), so a
    short run warms up like the seed's (3 % of 5 steps is 1 step, whose lr is 0, not none)."""
    return math.ceil(ratio * total_steps)


def total_steps_of(params, n_train: int) -> int:
    """Optimizer steps of a run: ``max_steps``, else ``num_epochs`` × optimizer batches per epoch."""
    opt_batch = params.batch_size * params.gradient_accumulation_steps
    return params.max_steps or max(1, math.ceil(params.num_epochs * math.ceil(n_train / opt_batch)))


def make_scheduler(optimizer, params, total_steps: int):
    """The run's learning-rate schedule (transformers ``get_scheduler``) over ``total_steps``."""
    from transformers import get_scheduler

    return get_scheduler(params.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(params.warmup_ratio, total_steps),
                         num_training_steps=total_steps)


@dataclass
class Built:
    """Everything ``build`` makes before training."""

    task: object
    tokenizer: object
    data: object
    model: torch.nn.Module
    saver: object
    """Saves a residual init's adapter (``ResidualSaver``); None for inits that leave W unchanged."""
    method: object
    cfg: object
    device: torch.device
    optimizer: torch.optim.Optimizer
    """The method's optimizer part's optimizer (``Method.make_optimizer``)."""
    scheduler: object
    total_steps: int
    wrapped: object = None
    """The model and its loss under DDP/FSDP2 (``distributed.wrap``) when more than one process trains."""
    init_adapter: dict | None = None
    """The saved adapter the run started from (``init_adapter.provenance``: path, weights' sha256, ...); None
    where the method's init made it."""
    named: object = None
    """The method the record names where that is not ``method`` (a run from a CorDA adapter: CorDA's,
    ``init_adapter.named_config``); None: ``method``."""
    calibration: dict | None = None
    """Where a data-driven init's calibration rows came from (``MethodContext.calibration_provenance``: file,
    split, overlap with the run's evaluations), or, for a run from a decomposition's adapter (``init_adapter``), the
    decomposition's (``init_adapter.calibration_provenance``); None where no calibration ran (a resumed run carries
    its first's)."""

    def make_optimizer(self, params):
        """A fresh optimizer of the method's optimizer part (FSDP: over the sharded parameters)."""
        return self.method.make_optimizer(self.model, self.cfg, params)


def build(exp: Experiment, life: Lifecycle | None = None, init_state: Path | None = None,
          trainable_names: list[str] | None = None) -> Built:
    """Model, tokenizer, task data, adapted model, saver, method, optimizer and schedule.

    ``init_state`` (resume of an init that rewrote the base weights) rebuilds the adapter from the
    saved init instead of redoing the decomposition; ``trainable_names`` then restores which tensors
    train. Raises ConfigError for a method that does not fit the model and for unreadable data.
    """
    life = life or Lifecycle()
    params = exp.params
    task = get_task(params.task)
    tokenizer = load_tokenizer(params.model_id)
    with _quiet_load_report():
        model = load_model(params.model_id, task.kind, getattr(task, "num_labels", 2), params.dtype)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = _pad_id(tokenizer)
    cfg = resolve_config(model, exp.peft_config, task.kind) if exp.peft_config is not None else None
    method = choose_method(cfg, params)
    problems = method.check(model, cfg, params)  # read_experiment checked these on the skeleton where it could
    problems += [p for p in (name_problems(model, cfg, params) if cfg is not None else []) if p not in problems]
    if problems:
        raise ConfigError(problems, str(exp.path))
    try:
        data = task.load(params, tokenizer)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - data that cannot be read is bad input: exit 2, no result
        raise ConfigError([f"task {params.task}: its data could not be read from {params.data_dir or 'the hub'}: "
                           f"{type(exc).__name__}: {str(exc)[:500]}"], str(exp.path)) from exc
    if not data.train:
        raise ConfigError([f"task {params.task} has no training examples in {params.data_dir or 'the hub'}"], str(exp.path))
    problems = check_labels(task, data)
    if problems:
        raise ConfigError(problems, str(exp.path))
    device = pick_device(params.device)
    model.to(device)
    ctx = MethodContext(params, data.train, tokenizer)
    if init_state is not None:
        plain = copy.deepcopy(cfg)
        plain.init_lora_weights = True
        model = build_peft(model, plain)
        checkpoint.restore_init_state(init_state, init_tensors(model))
        wanted = set(trainable_names or [])
        for name, p in model.named_parameters():
            p.requires_grad_(name in wanted)
        saver = ResidualSaver(model)
        calibration = None
    else:
        with life.enter("calibrate"):
            model, saver = method.apply(model, cfg, params, ctx)
        calibration = ctx.calibration_provenance
    source = named = None
    if params.init_adapter is not None:  # the folder's tensors replace the plain init (a --resume's checkpoint, them)
        init_adapter.load_weights(model, params.init_adapter)
        source = init_adapter.provenance(params.init_adapter, params.model_id)
        # its decomposition's calibration, checked against this run's evaluations (none ran here)
        calibration = init_adapter.calibration_provenance(source, ctx.evaluations(), params.data_dir,
                                                          params.init_adapter) or calibration
        named = choose_method(init_adapter.named_config(cfg), params)
    optimizer = method.make_optimizer(model, cfg, params)
    total_steps = total_steps_of(params, len(data.train))
    return Built(task, tokenizer, data, model, saver, method, cfg, device, optimizer,
                 make_scheduler(optimizer, params, total_steps), total_steps, calibration=calibration,
                 init_adapter=source, named=named)


def init_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors an init that rewrites the base weights leaves behind, by name (the live tensors):
    every adapted layer's base weight (``<layer>.base_layer.weight``) and every LoRA tensor. A
    resumed run writes the saved ones back into them (``checkpoint.save_init_state`` /
    ``restore_init_state``)."""
    tensors = {f"{name}.base_layer.weight": module.get_base_layer().weight for name, module in lora_modules(model)}
    tensors.update({name: p for name, p in model.named_parameters() if "lora_" in name})
    return tensors


def check_labels(task, data) -> list[str]:
    """Classification labels must be class ids in [0, num_labels) (regression: numbers); a label
    outside the task's classes would otherwise fail deep inside the loss, or train silently wrong."""
    if task.kind != "seq_cls":
        return []
    n = getattr(task, "num_labels", 2)
    problems = []
    for split, feats in (("train", data.train), ("eval", data.eval)):
        for i, f in enumerate(feats):
            y = f.get("labels")
            ok = isinstance(y, (int, float)) and not isinstance(y, bool) if n == 1 else \
                isinstance(y, int) and not isinstance(y, bool) and 0 <= y < n
            if not ok:
                allowed = "a number" if n == 1 else f"a class id in 0..{n - 1}"
                problems.append(f"{split} example {i}: label {y!r} is not {allowed} for task {task.name}")
                break
    return problems


@contextlib.contextmanager
def _quiet_load_report():
    """transformers prints a load report ("classifier.weight | MISSING") for every classification
    run: the head is new by design and trains with the adapter. Said once by the opening line
    instead; real load problems still raise."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
