"""The one training loop behind ``loralab run``: build -> loop -> save -> evaluate -> record.

- build: the model, the task data, the method's adapter (``calibrate`` for data-driven inits), the
  optimizer, the schedule and the step (``loralab.step``: micro-batching, exact loss
  normalisation, packing, CUDA graphs); on ``--resume``, the newest matching checkpoint.
- loop: one optimizer batch (``batch_size × gradient_accumulation_steps`` samples; the last of an
  epoch may be shorter, and is weighted exactly) per step; logging (stderr, and TensorBoard / W&B
  with ``report_to``: ``loralab.trackers``), evaluation and checkpoints every N steps; a signal
  stops after the step with a checkpoint.
- save first, evaluate second: adapter and tokenizer are on disk before any evaluation, which
  runs in the precision training used.
- record: one result file for every ending (``loralab.lifecycle``).

Under ``torchrun`` / ``accelerate launch`` (``loralab.distributed``) every rank builds the model and
runs the same loop over the same optimizer batches, each on its shard (``Step``); every rank
evaluates; rank 0 alone logs and writes checkpoints, the adapter and the result.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from loralab import checkpoint, distributed, results
from loralab.config import ConfigError
from loralab.data import pad_id as _pad_id
from loralab.experiment import Experiment
from loralab.lifecycle import Cancelled, Diverged, Lifecycle, error_info
from loralab.methods import choose_method
from loralab.methods.common import embeddings_trained
from loralab.methods.context import MethodContext
from loralab.methods.qlora import write_base_record
from loralab.models import load_model, load_tokenizer, model_provenance
from loralab.speed.defaults import resolve_speed
from loralab.speed.step import SpeedOptions, autocast_context, length_grouped_batches, prepare_model
from loralab.step import Step, loss_function, probe_micro_batch
from loralab.tasks import get_task
from loralab.trackers import Trackers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class MemoryMeter:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.samples: list[int] = []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self):
        if self.cuda:
            self.samples.append(torch.cuda.memory_allocated())

    def summary(self) -> dict:
        if not self.cuda:
            return {"peak_rss": results.peak_rss_bytes()}
        s = np.array(self.samples or [0])
        return {
            "cuda_memory_avg": int(s.mean()),
            "cuda_memory_max": int(torch.cuda.max_memory_allocated()),
            "cuda_memory_99th": int(np.percentile(s, 99)),
        }


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def output_dir(exp: Experiment, created_at: str) -> Path:
    root = Path(os.environ.get("LORALAB_OUTPUT_DIR", "outputs"))
    stamp = "".join(c if c.isalnum() or c in "-_." else "-" for c in created_at)
    return root / f"{exp.name.replace('/', '--')}--{stamp}"


@dataclass
class Built:
    """Everything ``build`` makes before training."""

    task: object
    tokenizer: object
    data: object
    model: torch.nn.Module
    saver: object
    method: object
    cfg: object
    device: torch.device
    wrapped: object = None
    """The model and its loss under DDP/FSDP2 (``distributed.wrap``) when more than one process trains."""


def build(exp: Experiment, life: Lifecycle | None = None, init_state: Path | None = None,
          trainable_names: list[str] | None = None):
    """Model, tokenizer, task data, adapted model, saver and method: everything before training.

    Method-specific checks that need the model's layer shapes run here, before any training; data
    that cannot be read is bad input (ConfigError). ``init_state`` (resume of an init that rewrote
    the base weights) rebuilds the adapter from the saved init instead of redoing the
    decomposition; ``trainable_names`` then restores which tensors train.
    Returns a ``Built``; unpacks as the former 8-tuple for older callers.
    """
    from loralab.methods.common import ResidualSaver, build_peft, resolve_config

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
    problems = method.check(model, cfg, params)
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
    if init_state is not None:
        plain = copy.deepcopy(cfg)
        plain.init_lora_weights = True
        model = build_peft(model, plain)
        checkpoint.restore_init_state(init_state, model)
        wanted = set(trainable_names or [])
        for name, p in model.named_parameters():
            p.requires_grad_(name in wanted)
        saver = ResidualSaver(model)
    else:
        ctx = MethodContext(params, data.train, tokenizer)
        with life.enter("calibrate"):
            model, saver = method.apply(model, cfg, params, ctx)
    return Built(task, tokenizer, data, model, saver, method, cfg, device)


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


def make_optimizer(model, method, cfg, params):
    custom = getattr(method, "make_optimizer", None)
    optimizer = custom(model, cfg, params) if custom else None
    if optimizer is None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        fused = bool(trainable) and trainable[0].is_cuda  # one kernel for all tensors on CUDA
        optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay, fused=fused)
    return optimizer


def warmup_steps(ratio: float, total_steps: int) -> int:
    """Warm-up steps for ``warmup_ratio``: ``ceil(ratio * total_steps)``, as transformers'
    ``TrainingArguments.get_warmup_steps`` computes it (the Trainer the seeds' scripts ran), so a
    short run warms up like the seed's (3 % of 5 steps is 1 step, whose lr is 0, not none)."""
    return math.ceil(ratio * total_steps)


def epoch_batches(n: int, lengths: list[int], size: int, epoch: int, params) -> list[list[int]]:
    """The optimizer batches of one epoch (indices): a fixed function of (seed, epoch), so a resumed
    run sees the same order. The last batch may be shorter (no sample dropped)."""
    if params.speed["group_by_length"]:
        return length_grouped_batches(lengths, size, seed=params.seed + epoch)
    order = np.random.default_rng([params.seed, epoch]).permutation(n)
    return [order[i:i + size].tolist() for i in range(0, n, size)]


FINISHED = "finished.json"


def find_resume(exp: Experiment, out_root: Path) -> tuple[Path | None, Path | None]:
    """(run output dir, checkpoint) of the newest checkpoint of this experiment whose configuration
    hashes match; (None, None) when there is none. Raises ConfigError naming the changed keys when
    checkpoints exist but none matches."""
    stem = exp.name.replace("/", "--") + "--"
    found = []
    for run_dir in out_root.glob(stem + "*") if out_root.is_dir() else []:
        for ckpt in checkpoint.list_checkpoints(run_dir / "checkpoints"):
            found.append((ckpt.stat().st_mtime, run_dir, ckpt))
    if not found:
        return None, None
    found.sort(key=lambda t: t[0])
    for _, run_dir, ckpt in reversed(found):
        state = checkpoint.read_state(ckpt)
        if state.get("train_params_sha") == exp.train_params_sha and state.get("peft_config_sha") == exp.peft_config_sha:
            done = run_dir / "checkpoints" / FINISHED
            if done.exists():
                raise ConfigError([f"--resume: the newest run of this experiment ({run_dir}) already finished; its result is "
                                   f"{json.loads(done.read_text()).get('result')}. Run without --resume to train it again."],
                                  str(exp.path))
            return run_dir, ckpt
    newest = checkpoint.read_state(found[-1][2])
    changes = checkpoint.config_changes(newest.get("config", {}), _config(exp))
    raise ConfigError([f"--resume: the configuration changed since checkpoint {found[-1][2]}; changed keys: "
                       + ("; ".join(changes) or "(hash differs)")
                       + ". Restore them, or run without --resume to start afresh."], str(exp.path))


def _config(exp: Experiment) -> dict:
    return {"training_parameters": exp.params.to_dict(),
            "adapter_config": exp.peft_config.to_dict() if exp.peft_config is not None else None}


def _quiet(line: str) -> None:
    """Ranks other than 0 log nothing."""


def _say(verbose: bool):
    def say(line: str):
        print(f"[loralab] {line}", file=sys.stderr, flush=True)
    return say


def run_experiment(exp: Experiment, verbose: bool = False, resume: bool = False,
                   evaluate: bool = True) -> tuple[dict, Path]:
    """Train and evaluate one experiment; returns (result record, result path).

    ``evaluate`` False skips the final evaluation (``loralab bench --experiment`` times training only).
    Every ending writes a record (``loralab.lifecycle``). A cancelled run raises
    ``KeyboardInterrupt(path)`` after writing it, a failed or diverged one re-raises its error with
    ``result_path`` set on it; bad input raises ConfigError before anything is written.
    """
    params = exp.params
    launch = distributed.current()
    say = _say(verbose) if launch.is_main else _quiet
    # peft asks transformers a deprecated question on every model it wraps; not ours to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    start = time.perf_counter()
    created_at = distributed.broadcast_object(results.now_iso())  # one output folder for all ranks
    git = results.git_state(experiment=exp.path)  # the tree the code runs from
    out_root = Path(os.environ.get("LORALAB_OUTPUT_DIR", "outputs"))
    run_dir, resume_from = find_resume(exp, out_root) if resume else (None, None)
    if resume and resume_from is None:
        say("--resume: no checkpoint of this experiment yet; starting from the beginning")
    out_dir = run_dir or output_dir(exp, created_at)
    ckpt_root = out_dir / "checkpoints"
    life = Lifecycle(log=say)
    record = {"status": "success", "error": None, "step": 0, "history": [], "final": {}, "adapter_path": None,
              "file_size": None, "train_time": 0.0, "samples": 0, "tokens": 0, "speed": {}, "timing": {},
              "total_steps": None, "trainable": None, "method": None, "cfg": None, "provenance": {}, "meter": None,
              "checkpoint": str(resume_from) if resume_from else None, "resumed_from": str(resume_from) if resume_from else None}
    state = {}
    trackers = Trackers()  # none until built; ranks other than 0 keep none
    with life:
        try:
            seed_everything(params.seed)
            resume_state = checkpoint.read_state(resume_from) if resume_from else None
            init_state = ckpt_root / checkpoint.INIT_STATE
            built = build(exp, life,
                          init_state=init_state if resume_state and resume_state.get("init_state") else None,
                          trainable_names=resume_state.get("trainable_names") if resume_state else None)
            record.update(method=built.method, cfg=built.cfg, provenance=built.data.provenance)
            if launch.is_main:
                trackers = Trackers.open(params, out_dir, _config(exp), (resume_state or {}).get("step", 0))
            say(f"{exp.name}: {params.model_id} ({params.dtype}) on {params.task} "
                f"({len(built.data.train)} train / {len(built.data.eval)} eval examples), method {built.method.NAME}, "
                f"device {built.device}; adapter -> {out_dir / 'adapter'}, result -> "
                f"{results.route('success', git).resolve()}/ (on success)"
                + ("; the classification head starts from random weights and trains with the adapter"
                   if built.task.kind == "seq_cls" else ""))
            state = _train(exp, built, life, say, trackers, record, ckpt_root, resume_from, resume_state, verbose)
            with life.enter("save"):
                _save(built, out_dir / "adapter", record)
                say(f"adapter saved to {out_dir / 'adapter'}")
            if evaluate:
                with life.enter("evaluate"):
                    say(f"evaluating {params.task} ({len(built.data.eval)} examples)")
                    t0 = time.perf_counter()
                    metrics = _evaluate(built, params, out_dir)
                    record["timing"]["final_eval_s"] = time.perf_counter() - t0
                    record["final"] = metrics
                    trackers.log({f"eval/{k}": v for k, v in metrics.items()}, record["step"])
                    record["history"].append({"step": record["step"], "train samples": record["samples"],
                                              **{f"final {k}": v for k, v in metrics.items()}})
        except ConfigError:
            raise
        except Cancelled as exc:
            record["status"] = "cancelled"
            record["error"] = {"type": "Cancelled", "message": str(exc) or "SIGINT", "phase": life.phase}
        except KeyboardInterrupt:
            record["status"] = "cancelled"
            record["error"] = {"type": "KeyboardInterrupt", "message": "SIGINT", "phase": life.phase}
        except Diverged as exc:
            record["status"] = "diverged"
            last = checkpoint.list_checkpoints(ckpt_root)
            record["error"] = {**error_info(exc, life.phase), "step": exc.step,
                               "last_good_checkpoint": str(last[-1]) if last else None}
            record["exception"] = exc
        except Exception as exc:  # noqa: BLE001 - every ending gets a record; re-raised below
            record["status"] = "failed"
            record["error"] = error_info(exc, life.phase)
            record["exception"] = exc
        finally:
            trackers.close(record["status"])
    result = _record(exp, record, created_at, git, start, state)
    path = results.write_result(result, git) if launch.is_main else None
    if record["status"] == "success" and launch.is_main and (out_dir / "checkpoints").is_dir():
        (out_dir / "checkpoints" / FINISHED).write_text(json.dumps({"result": str(path)}))  # --resume: nothing left
    if record["status"] == "cancelled":
        raise KeyboardInterrupt(str(path))
    if record["status"] in ("failed", "diverged"):
        exc = record["exception"]
        exc.result_path = path
        raise exc
    return result, path


def _train(exp, built: Built, life: Lifecycle, say, trackers: Trackers, record: dict, ckpt_root: Path,
           resume_from: Path | None, resume_state: dict | None, verbose: bool) -> dict:
    from transformers import get_scheduler

    params = exp.params
    model, device, task = built.model, built.device, built.task
    launch = distributed.current()
    speed = resolve_speed(params.speed, device=device, kind=task.kind, base_dtype=params.dtype)
    if launch.distributed:
        _distributed_speed(speed, launch, built, say)
    optimizer = make_optimizer(model, built.method, built.cfg, params)
    record["trainable"] = count_trainable(model)
    option_names = {f.name for f in fields(SpeedOptions)}
    prepare_model(model, SpeedOptions(**{k: v for k, v in speed.items() if k in option_names}))
    if launch.distributed:
        autocast = getattr(torch, speed["autocast"]) if speed.get("autocast") else None
        built.wrapped = distributed.wrap(model, loss_function(task.kind), launch, device, compute_dtype=autocast)
        if launch.sharding == "fsdp":  # parameters are DTensors now
            optimizer = make_optimizer(model, built.method, built.cfg, params)
    n = len(built.data.train)
    lengths = [len(f["input_ids"]) for f in built.data.train]
    opt_batch = params.batch_size * params.gradient_accumulation_steps
    steps_per_epoch = math.ceil(n / opt_batch)
    total_steps = params.max_steps or max(1, math.ceil(params.num_epochs * steps_per_epoch))
    record["total_steps"] = total_steps
    scheduler = get_scheduler(params.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(params.warmup_ratio, total_steps),
                              num_training_steps=total_steps)
    ckpt_every = params.checkpoint_steps if params.checkpoint_steps is not None else max(1, total_steps // 10)
    pad = _pad_id(built.tokenizer)
    micro = speed["micro_batch"]
    if micro == "auto":  # CUDA: probed with the built model
        micro = probe_micro_batch(model, built.data.train, kind=task.kind, packing=speed["packing"],
                                  max_length=params.max_length, limit=opt_batch, pad_id=pad, device=device, log=say)
        micro = distributed.min_over_ranks(micro)  # one micro-batch for every rank
    elif micro is None:
        micro = params.batch_size
    speed["micro_batch"] = micro
    if resume_from is not None:
        state = checkpoint.load(resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
        if launch.is_main:
            checkpoint.prune(ckpt_root, params.keep_checkpoints)
        say(f"resumed from {resume_from} (step {state['step']} of {total_steps})")
    else:
        state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0, "tokens": 0, "history": [],
                 "running": [], "train_time": 0.0, "warmup_time": 0.0, "steady_time": 0.0, "steady_tokens": 0,
                 "steady_samples": 0}
        if built.saver is not None and hasattr(built.saver, "initial"):
            if launch.is_main:
                checkpoint.save_init_state(ckpt_root, model)  # resume without redoing the decomposition
            state["init_state"] = True
    state.update(train_params_sha=exp.train_params_sha, peft_config_sha=exp.peft_config_sha, config=_config(exp),
                 trainable_names=[n for n, p in model.named_parameters() if p.requires_grad])
    step_fn = Step(model, optimizer, kind=task.kind, normalization=params.loss_normalization, micro_batch=micro,
                   packing=speed["packing"], max_length=params.max_length,
                   pad_to=params.max_length if params.pad_to_max_length else None, pad_id=pad, device=device,
                   graphs=speed["cuda_graphs"], max_grad_norm=params.max_grad_norm, log=say, wrapped=built.wrapped)
    if resume_from is not None:
        checkpoint.load_rng(resume_from)  # last: nothing between here and the next step draws
    meter = MemoryMeter(device)
    record.update(meter=meter, speed=speed)
    trackers.log_config({"resolved": {"method": built.method.NAME, "total_steps": total_steps,
                                      "trainable_params": record["trainable"], "speed": speed}}, state["step"])
    running = [torch.tensor(x, device=device) for x in state["running"]]
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def sync_checks(step: int):
        """At logging/checkpoint points (one host sync): stop on a non-finite loss or weight."""
        if int(bad_step) >= 0:
            raise Diverged(int(bad_step), "non-finite loss")
        if trainable and not bool(torch.stack(torch._foreach_norm(trainable)).isfinite().all()):
            raise Diverged(step, "non-finite trainable weight")

    def write_checkpoint(step: int):
        state["running"] = [float(x) for x in running]
        if launch.distributed and launch.sharding == "fsdp":
            return  # not written under FSDP (logged at start)
        if launch.is_main:  # DDP: every rank holds the same weights and optimizer state
            path = checkpoint.save(ckpt_root, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                   state=state, keep=params.keep_checkpoints)
            record["checkpoint"] = str(path)
        distributed.barrier()

    def evaluate_now(step: int) -> dict:
        metrics = _evaluate(built, params, None)
        trackers.log({f"eval/{k}": v for k, v in metrics.items()}, step)
        model.train()
        return metrics

    # a live bar on a terminal (or with -v): loss, learning rate, steady tokens/s, ETA; rank 0 only
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"train {exp.name}",
               disable=(False if verbose else None) if launch.is_main else True,
               dynamic_ncols=True, file=sys.stderr)
    model.train()
    window = {"t": 0.0, "tokens": 0, "samples": 0, "clean": True}
    try:
        with life.enter("train"):
            while state["step"] < total_steps:
                batches = epoch_batches(n, lengths, opt_batch, state["epoch"], params)
                while state["batch_in_epoch"] < len(batches) and state["step"] < total_steps:
                    t0 = time.perf_counter()
                    graphs_before = step_fn.trainer.graphs
                    stats = step_fn([built.data.train[j] for j in batches[state["batch_in_epoch"]]])
                    scheduler.step()
                    meter.sample()
                    state["step"] += 1
                    state["batch_in_epoch"] += 1
                    step = state["step"]
                    bad_step = torch.where((bad_step < 0) & ~torch.isfinite(stats.loss), step, bad_step)
                    running.append(stats.loss.detach())
                    state["samples"] += stats.samples
                    state["tokens"] += stats.tokens
                    log_now = step % params.logging_steps == 0 or step == total_steps
                    ckpt_now = ckpt_every > 0 and step % ckpt_every == 0 and step != total_steps
                    stop_now = bool(life.stop_requested)
                    if launch.distributed:  # every rank stops after the same step: agreed at log/checkpoint steps
                        stop_now = (log_now or ckpt_now) and distributed.any_rank(stop_now)
                    sync = log_now or ckpt_now or stop_now
                    if sync and device.type == "cuda":
                        torch.cuda.synchronize()  # steps run ahead of the host; charge their GPU time here
                    dt = time.perf_counter() - t0
                    state["train_time"] += dt
                    window["t"] += dt
                    window["tokens"] += stats.tokens
                    window["samples"] += stats.samples
                    window["clean"] &= step_fn.trainer.graphs == graphs_before and step > 1
                    if sync:
                        key = "steady" if window["clean"] else "warmup"
                        state[f"{key}_time"] += window["t"]
                        if window["clean"]:
                            state["steady_tokens"] += window["tokens"]
                            state["steady_samples"] += window["samples"]
                        window = {"t": 0.0, "tokens": 0, "samples": 0, "clean": True}
                        sync_checks(step)
                    bar.update(1)
                    if log_now:
                        entry = {"step": step, "train loss": float(torch.stack(running).mean()),
                                 "lr": float(scheduler.get_last_lr()[0]), "train samples": state["samples"],
                                 "train tokens": state["tokens"]}
                        running = []
                        rate = state["steady_tokens"] / state["steady_time"] if state["steady_time"] else None
                        trackers.log({"train/loss": entry["train loss"], "train/learning_rate": entry["lr"],
                                      "train/tokens_per_second": rate}, step)
                        if params.eval_steps and step % params.eval_steps == 0 and step != total_steps:
                            entry.update({f"eval {k}": v for k, v in evaluate_now(step).items()})
                        state["history"].append(entry)
                        bar.set_postfix(loss=f"{entry['train loss']:.4f}", lr=f"{entry['lr']:.2e}",
                                        **({"tok/s": f"{rate:,.0f}"} if rate else {}))
                        if bar.disable:  # no live bar (stderr is no terminal, no -v): one line per log step
                            evals = "".join(f", {k} {v:.4g}" for k, v in entry.items() if k.startswith("eval "))
                            say(f"step {step}/{total_steps}: loss {entry['train loss']:.4f}, lr {entry['lr']:.2e}"
                                + (f", {rate:,.0f} tokens/s" if rate else "") + evals)
                    elif params.eval_steps and step % params.eval_steps == 0:
                        state["history"].append({"step": step, "train samples": state["samples"],
                                                 **{f"eval {k}": v for k, v in evaluate_now(step).items()}})
                    if ckpt_now:
                        write_checkpoint(step)
                    if stop_now:
                        write_checkpoint(step)
                        raise Cancelled(life.stop_requested or "SIGTERM")
                if state["batch_in_epoch"] >= len(batches):
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
    finally:
        bar.close()
        record.update(step=state["step"], history=state["history"], samples=state["samples"], tokens=state["tokens"],
                      train_time=state["train_time"])
        record["timing"].update(warmup_s=state["warmup_time"], steady_s=state["steady_time"],
                                steady_tokens=state["steady_tokens"], steady_samples=state["steady_samples"],
                                micro_batch=step_fn.micro_batch, oom_retries=step_fn.oom_retries,
                                cuda_graphs=step_fn.trainer.graphs)
        record["launch"] = launch.record(step_fn.micro_batch)
    return state


def _distributed_speed(speed: dict, launch, built: Built, say) -> None:
    """What more than one process turns off (in place, logged): CUDA graphs (no collectives in a
    capture); under FSDP also compile, the micro-batch probe and mid-run checkpoints."""
    if speed.get("cuda_graphs"):
        say(f"CUDA graphs off: {launch.world_size} processes ({launch.sharding}) reduce gradients outside any capture")
        speed["cuda_graphs"] = False
    if launch.sharding != "fsdp":
        return
    if built.saver is not None:
        raise ConfigError([(f"method {built.method.NAME} rewrites the base weights, which FSDP shards; "
                            "run it with DDP (loralab run --sharding ddp)")])
    if speed.get("compile"):
        say("compile off under FSDP (regional compile of sharded layers is not supported here)")
        speed["compile"] = False
    if speed.get("micro_batch") == "auto":
        say("micro-batch: no probe under FSDP; the experiment's batch_size (set speed.micro_batch to change)")
        speed["micro_batch"] = None
    say("no mid-run checkpoints under FSDP: the adapter/model is gathered and written at the end")


def _save(built: Built, path: Path, record: dict) -> None:
    """The adapter (or full model) and tokenizer; only trained tensors (no frozen embedding copies)."""
    model = built.model
    gathered = {}
    if distributed.is_sharded(built.wrapped):  # FSDP: a collective, then rank 0 writes
        gathered = {"state_dict": distributed.full_state_dict(built.wrapped)}
    if not distributed.is_main():
        return
    if built.saver is not None:
        built.saver.save(model, path)
    elif hasattr(model, "peft_config"):
        model.save_pretrained(path, save_embedding_layers=embeddings_trained(model), **gathered)
    else:
        model.save_pretrained(path, **gathered)
    if hasattr(model, "peft_config"):  # the base it trained on (float / NF4), for an exact `loralab merge`
        write_base_record(model, path)
    built.tokenizer.save_pretrained(path)
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
    record["adapter_path"] = str(path)
    record["file_size"] = sum(p.stat().st_size for p in weights)


def _evaluate(built: Built, params, out_dir) -> dict:
    """The task's metrics, in the precision training used (the model's autocast). More than one
    process: every rank evaluates (generation loops split their batches over DDP ranks with
    ``distributed.share``); rank 0 alone writes files."""
    out_dir = out_dir if distributed.is_main() else None
    with torch.no_grad(), autocast_context(built.model, built.device.type), distributed.gathered(built.wrapped):
        return built.task.evaluate(built.model, built.tokenizer, built.data, params, out_dir)


def _record(exp: Experiment, r: dict, created_at: str, git: dict, start: float, state: dict) -> dict:
    params = exp.params
    timing = r["timing"]
    steady = timing.get("steady_s") or 0.0
    method = r["method"]
    train_info = {
        "status": r["status"],
        "train_time": r["train_time"],
        "steps": r["step"],
        "total_steps": r["total_steps"],
        "trainable_params": r["trainable"],
        "file_size": r["file_size"],
        "adapter_path": r["adapter_path"],
        "checkpoint": r["checkpoint"],
        "resumed_from": r["resumed_from"],
        "train_samples": r["samples"],
        "train_tokens": r["tokens"],
        "tokens_per_second": timing.get("steady_tokens", 0) / steady if steady else None,
        "samples_per_second": timing.get("steady_samples", 0) / steady if steady else None,
        "warmup_time": timing.get("warmup_s"),
        "timing": timing,
        "speed": {k: v for k, v in r["speed"].items()},
        "loss_normalization": params.loss_normalization,
        "distributed": r.get("launch") or distributed.current().record(None),
        **(r["meter"].summary() if r["meter"] is not None else {}),
        "metrics": r["history"],
    }
    if r["error"] is not None:
        train_info["error"] = r["error"]
    parts = getattr(method, "parts", None)
    return {
        "run_info": {
            "created_at": created_at,
            "total_time": time.perf_counter() - start,
            "experiment_name": exp.name,
            "git": git,
            "train_params_sha": exp.train_params_sha,
            "peft_config_sha": exp.peft_config_sha,
            "method": method.NAME if method is not None else None,
            "method_parts": dict(parts) if parts else None,
            "init_cost": getattr(method, "init_cost", None),
            "task": params.task,
            "seed": params.seed,
            "config": {
                "training_parameters": params.to_dict(),
                "adapter_config": r["cfg"].to_dict() if r["cfg"] is not None else None,
            },
        },
        "train_info": train_info,
        "eval": r["final"],
        "meta_info": {
            "model": model_provenance(params.model_id),
            "dataset": {"task": params.task, **r["provenance"]},
            "package_info": results.package_info(),
            "system_info": results.system_info(),
        },
    }
