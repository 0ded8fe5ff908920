"""The one training loop behind ``loralab run``: build the model and the method's adapter, train,
evaluate, save a peft adapter, and return the result record. Read it top to bottom.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from loralab import results
from loralab.experiment import Experiment
from loralab.methods import choose_method
from loralab.methods.context import MethodContext
from loralab.data import collate, pad_id as _pad_id
from loralab.models import load_model, load_tokenizer, model_provenance
from loralab.speed.graphs import GraphedTraining, bucket_width
from loralab.speed.step import (
    SpeedOptions,
    causal_lm_loss,
    length_grouped_batches,
    pack_features,
    prepare_model,
    seq_cls_loss,
)
from loralab.tasks import get_task


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


def build(exp: Experiment):
    """Model, tokenizer, task data, adapted model, saver and method: everything before training.

    Method-specific checks that need the model's layer shapes run here, before any training.
    """
    from loralab.config import ConfigError
    from loralab.methods.common import resolve_config

    params = exp.params
    task = get_task(params.task)
    tokenizer = load_tokenizer(params.model_id)
    model = load_model(params.model_id, task.kind, getattr(task, "num_labels", 2), params.dtype)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = _pad_id(tokenizer)
    cfg = resolve_config(model, exp.peft_config, task.kind) if exp.peft_config is not None else None
    method = choose_method(cfg, params)
    problems = method.check(model, cfg, params)
    if problems:
        raise ConfigError(problems, str(exp.path))
    data = task.load(params, tokenizer)
    if not data.train:
        raise ConfigError([f"task {params.task} has no training examples in {params.data_dir or 'the hub'}"], str(exp.path))
    device = pick_device(params.device)
    model.to(device)
    ctx = MethodContext(params, data.train, tokenizer)
    model, saver = method.apply(model, cfg, params, ctx)
    return task, tokenizer, data, model, saver, method, cfg, device


def micro_batch(features, kind, params, pad_id, pad_to, device, bucket: bool = False) -> dict:
    """One micro-batch on ``device``: padded, or (causal LM, ``speed.packing``) packed into one row
    whose samples do not attend to each other. ``bucket`` rounds the padded width up to a few fixed
    widths (``graphs.bucket_width``) so CUDA graphs can be replayed; padding is masked, so the
    loss is the same."""
    if kind == "causal_lm" and params.speed["packing"]:
        width = bucket_width(sum(len(f["input_ids"]) for f in features)) if bucket else None
        batch = pack_features(features, pad_to=width, pad_token_id=pad_id)
        batch.pop("seq_lens", None)
    else:
        width = pad_to or (bucket_width(max(len(f["input_ids"]) for f in features)) if bucket else None)
        batch = collate(features, pad_id, width)
    return {k: v.to(device) for k, v in batch.items()}


def batch_loss(kind: str):
    """The mean-loss function of a task kind: chunked LM-head loss (``speed.chunked_loss``) for
    causal LMs, the model's own loss for classification; both under ``speed.autocast``."""
    if kind == "causal_lm":
        return lambda model, batch: causal_lm_loss(model, batch)[0]
    return lambda model, batch: seq_cls_loss(model, batch)[0]


def make_optimizer(model, method, cfg, params):
    custom = getattr(method, "make_optimizer", None)
    optimizer = custom(model, cfg, params) if custom else None
    if optimizer is None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        fused = bool(trainable) and trainable[0].is_cuda  # one kernel for all tensors on CUDA
        optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay, fused=fused)
    return optimizer


def run_experiment(exp: Experiment, verbose: bool = False) -> tuple[dict, Path]:
    """Train and evaluate one experiment; returns (result record, result path).

    Ctrl-C during training writes a ``cancelled`` record and then re-raises KeyboardInterrupt.
    """
    from transformers import get_scheduler

    params = exp.params
    start = time.perf_counter()
    created_at = results.now_iso()
    git = results.git_state(exp.path)
    seed_everything(params.seed)
    task, tokenizer, data, model, saver, method, cfg, device = build(exp)
    optimizer = make_optimizer(model, method, cfg, params)
    trainable = count_trainable(model)
    option_names = {f.name for f in fields(SpeedOptions)}
    prepare_model(model, SpeedOptions(**{k: v for k, v in params.speed.items() if k in option_names}))
    lengths = [len(f["input_ids"]) for f in data.train]

    micro_per_epoch = math.ceil(len(data.train) / params.batch_size)
    steps_per_epoch = max(1, micro_per_epoch // params.gradient_accumulation_steps)
    total_steps = params.max_steps or max(1, math.ceil(params.num_epochs * steps_per_epoch))
    scheduler = get_scheduler(
        params.lr_scheduler, optimizer, num_warmup_steps=int(params.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    out_dir = output_dir(exp, created_at)
    pad_to = params.max_length if params.pad_to_max_length else None
    graphs = params.speed["cuda_graphs"] and device.type == "cuda"
    trainer = GraphedTraining(model, optimizer, batch_loss(task.kind), max_grad_norm=params.max_grad_norm,
                              enabled=graphs)
    meter = MemoryMeter(device)
    history: list[dict] = []
    status, step, samples_seen, running = "success", 0, 0, []
    rng = np.random.default_rng(params.seed)
    train_time = 0.0
    bar = tqdm(total=total_steps, desc=f"train {exp.name}", disable=not verbose, dynamic_ncols=True)

    def log_eval(tag: str):
        metrics = task.evaluate(model, tokenizer, data, params, out_dir if tag == "final" else None)
        model.train()
        return metrics

    model.train()
    try:
        epoch = 0
        while step < total_steps:
            if params.speed["group_by_length"]:
                batches = length_grouped_batches(lengths, params.batch_size, seed=params.seed + epoch)
            else:
                order = rng.permutation(len(data.train))
                batches = [order[i : i + params.batch_size] for i in range(0, len(order), params.batch_size)]
            epoch += 1
            for i in range(0, len(batches) - params.gradient_accumulation_steps + 1, params.gradient_accumulation_steps):
                t0 = time.perf_counter()
                group = batches[i : i + params.gradient_accumulation_steps]
                n_group = sum(len(b) for b in group)
                loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
                for idx in group:
                    batch = micro_batch([data.train[j] for j in idx], task.kind, params, _pad_id(tokenizer), pad_to, device, bucket=graphs)
                    loss_sum += trainer.micro(batch, len(idx) / n_group) * len(idx)
                    meter.sample()
                trainer.step()
                scheduler.step()
                step += 1
                samples_seen += n_group
                running.append(loss_sum / n_group)
                if device.type == "cuda" and (step % params.logging_steps == 0 or step == total_steps):
                    torch.cuda.synchronize()  # steps run ahead of the host; charge their GPU time here
                train_time += time.perf_counter() - t0
                bar.update(1)
                if step % params.logging_steps == 0 or step == total_steps:
                    entry = {"step": step, "train loss": float(torch.stack(running).mean()),
                             "lr": float(scheduler.get_last_lr()[0]), "train samples": samples_seen}
                    running = []
                    if params.eval_steps and step % params.eval_steps == 0 and step != total_steps:
                        entry.update({f"eval {k}": v for k, v in log_eval("step").items()})
                    history.append(entry)
                    bar.set_postfix(loss=f"{entry['train loss']:.4f}")
                elif params.eval_steps and step % params.eval_steps == 0:
                    history.append({"step": step, "train samples": samples_seen, **{f"eval {k}": v for k, v in log_eval("step").items()}})
                if step >= total_steps:
                    break
    except KeyboardInterrupt:
        status = "cancelled"
    finally:
        bar.close()

    final_metrics: dict = {}
    file_size = None
    adapter_path = None
    if status == "success":
        final_metrics = log_eval("final")
        history.append({"step": step, "train samples": samples_seen, **{f"final {k}": v for k, v in final_metrics.items()}})
        adapter_path = out_dir / "adapter"
        if saver is not None:
            saver.save(model, adapter_path)
        else:
            model.save_pretrained(adapter_path)
        tokenizer.save_pretrained(adapter_path)
        weights = [p for p in adapter_path.iterdir() if p.suffix in (".safetensors", ".bin")]
        file_size = sum(p.stat().st_size for p in weights)

    record = {
        "run_info": {
            "created_at": created_at,
            "total_time": time.perf_counter() - start,
            "experiment_name": exp.name,
            "git": git,
            "train_params_sha": exp.train_params_sha,
            "peft_config_sha": exp.peft_config_sha,
            "method": method.NAME,
            "config": {
                "training_parameters": params.to_dict(),
                "adapter_config": cfg.to_dict() if cfg is not None else None,
            },
        },
        "train_info": {
            "status": status,
            "train_time": train_time,
            "steps": step,
            "total_steps": total_steps,
            "trainable_params": trainable,
            "file_size": file_size,
            "adapter_path": str(adapter_path) if adapter_path else None,
            **meter.summary(),
            "metrics": history,
        },
        "eval": final_metrics,
        "meta_info": {
            "model": model_provenance(params.model_id),
            "dataset": {"task": params.task, **data.provenance},
            "package_info": results.package_info(),
            "system_info": results.system_info(),
        },
    }
    path = results.write_result(record, git)
    if status == "cancelled":
        raise KeyboardInterrupt(str(path))
    return record, path
