"""The optimizer-step loop, and nothing else: step, meter, and one block for what happens at a
logging, evaluation or checkpoint step.

One optimizer batch (``batch_size × gradient_accumulation_steps`` samples; the last of an epoch may
be shorter, and is weighted exactly) per step, in an order that is a fixed function of (seed,
epoch) so a resumed run sees the same batches. Logging (stderr, and TensorBoard / W&B through
``loralab.trackers``), evaluation and checkpoints every N steps; a non-finite loss or weight stops
the run (``Diverged``) at the next of those steps; a signal stops it after the step with a
checkpoint (``Cancelled``). Under more than one process every rank runs the same loop and they
agree on a stop at logging/checkpoint steps.
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from loralab import distributed
from loralab.run.record import Cancelled, Diverged
from loralab.speed.packing import length_grouped_batches


def epoch_batches(n: int, lengths: list[int], size: int, epoch: int, params) -> list[list[int]]:
    """The optimizer batches of one epoch (indices): a fixed function of (seed, epoch), so a resumed
    run sees the same order. The last batch may be shorter (no sample dropped)."""
    if params.speed["group_by_length"]:
        return length_grouped_batches(lengths, size, seed=params.seed + epoch)
    order = np.random.default_rng([params.seed, epoch]).permutation(n)
    return [order[i:i + size].tolist() for i in range(0, n, size)]


class Watch:
    """Divergence: the first step with a non-finite loss is kept on the device (no host sync per
    step); ``check`` reads it, and the trainable weights' norms, at the steps that sync anyway."""

    def __init__(self, model, device):
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def see(self, loss: torch.Tensor, step: int) -> None:
        """Note ``step`` if its loss (a device scalar) is the first non-finite one; no host sync."""
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss), step, self.bad_step)

    def check(self, step: int) -> None:
        """Raises ``Diverged`` on a non-finite loss seen so far or a non-finite trainable weight."""
        if int(self.bad_step) >= 0:
            raise Diverged(int(self.bad_step), "non-finite loss")
        if self.trainable and not bool(torch.stack(torch._foreach_norm(self.trainable)).isfinite().all()):
            raise Diverged(step, "non-finite trainable weight")


def train(name: str, params, built, step_fn, state: dict, *, life, meter, trackers, evaluate: Callable[[int], dict],
          save_checkpoint: Callable[[int], None], say: Callable[[str], None], verbose: bool) -> None:
    """Run optimizer steps from ``state['step']`` to ``built.total_steps``, updating ``state`` (the
    checkpoint state: step, epoch, batch_in_epoch, samples, tokens, history, running losses, times).

    ``evaluate(step)`` returns the task's metrics, ``save_checkpoint(step)`` writes ``state`` and the
    weights. Raises ``Diverged`` or ``Cancelled`` (after a checkpoint) to end the run early.
    """
    total, train_set, scheduler = built.total_steps, built.data.train, built.scheduler
    launch = distributed.current()
    ckpt_every = params.checkpoint_steps if params.checkpoint_steps is not None else max(1, total // 10)
    opt_batch = params.batch_size * params.gradient_accumulation_steps
    lengths = [len(f["input_ids"]) for f in train_set]
    running = [torch.tensor(x, device=built.device) for x in state["running"]]
    watch = Watch(built.model, built.device)
    # a live bar on a terminal (or with -v): loss, learning rate, steady tokens/s, ETA; rank 0 only
    bar = tqdm(total=total, initial=state["step"], desc=f"train {name}", dynamic_ncols=True, file=sys.stderr,
               disable=(False if verbose else None) if launch.is_main else True)
    built.model.train()
    try:
        with life.enter("train"):
            while state["step"] < total:
                batches = epoch_batches(len(train_set), lengths, opt_batch, state["epoch"], params)
                while state["batch_in_epoch"] < len(batches) and state["step"] < total:
                    meter.start(step_fn)
                    stats = step_fn([train_set[j] for j in batches[state["batch_in_epoch"]]])
                    step = state["step"] + 1
                    log_now = step % params.logging_steps == 0 or step == total
                    # the rate this step's update used, read before the scheduler sets the next step's (a device
                    # tensor under CUDA graphs: read at logging steps only, which synchronise anyway)
                    lr = float(scheduler.get_last_lr()[0]) if log_now else None
                    scheduler.step()
                    meter.memory.sample()
                    state["step"] = step
                    state["batch_in_epoch"] += 1
                    watch.see(stats.loss, step)
                    running.append(stats.loss.detach())
                    state["samples"] += stats.samples
                    state["tokens"] += stats.tokens
                    eval_now = bool(params.eval_steps) and step % params.eval_steps == 0 and step != total
                    ckpt_now = ckpt_every > 0 and step % ckpt_every == 0 and step != total
                    stop_now = bool(life.stop_requested)
                    if launch.distributed:  # every rank stops after the same step: agreed at log/checkpoint steps
                        stop_now = (log_now or ckpt_now) and distributed.any_rank(stop_now)
                    sync = log_now or ckpt_now or stop_now
                    meter.stop(step_fn, step, stats, sync)
                    if sync:
                        watch.check(step)
                    bar.update(1)
                    if log_now or eval_now or ckpt_now or stop_now:
                        if log_now:
                            entry = _log_entry(step, state, running, lr, meter, trackers)
                            running = []
                        else:
                            entry = {"step": step, "train samples": state["samples"]}
                        if eval_now:
                            entry.update({f"eval {k}": v for k, v in evaluate(step).items()})
                        if log_now or eval_now:
                            state["history"].append(entry)
                        if log_now:
                            _show(entry, total, meter.tokens_per_second(), bar, say)
                        if ckpt_now or stop_now:
                            state["running"] = [float(x) for x in running]
                            save_checkpoint(step)
                        if stop_now:
                            raise Cancelled(life.stop_requested or "SIGTERM")
                if state["batch_in_epoch"] >= len(batches):
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
    finally:
        bar.close()


def _log_entry(step: int, state: dict, running: list, lr: float, meter, trackers) -> dict:
    """The history entry of a logging step (mean train loss since the last one; ``lr``: the learning
    rate of this step's optimizer update), sent to the trackers."""
    entry = {"step": step, "train loss": float(torch.stack(running).mean()), "lr": lr,
             "train samples": state["samples"], "train tokens": state["tokens"]}
    trackers.log({"train/loss": entry["train loss"], "train/learning_rate": entry["lr"],
                  "train/tokens_per_second": meter.tokens_per_second()}, step)
    return entry


def _show(entry: dict, total: int, rate: float | None, bar, say) -> None:
    """The bar's postfix; without a live bar (stderr is no terminal, no -v) one line per log step."""
    bar.set_postfix(loss=f"{entry['train loss']:.4f}", lr=f"{entry['lr']:.2e}", **({"tok/s": f"{rate:,.0f}"} if rate else {}))
    if bar.disable:
        evals = "".join(f", {k} {v:.4g}" for k, v in entry.items() if k.startswith("eval "))
        say(f"step {entry['step']}/{total}: loss {entry['train loss']:.4f}, lr {entry['lr']:.2e}"
            + (f", {rate:,.0f} tokens/s" if rate else "") + evals)
