"""One optimizer step over one optimizer batch: micro-batching, packing, bucketing, the exact loss
normalisation, CUDA graphs (or their eager twin) and the optimizer; ``make_step`` is the one
factory that builds it (``loralab run`` and ``loralab bench`` both call it).

The optimizer batch is the experiment's ``batch_size × gradient_accumulation_steps`` samples and
never changes; ``speed.micro_batch`` only decides how it is cut into forwards. Every token ``t``
of sample ``s`` carries a weight so that the sum over micro-batches of ``Σ_t w_t · CE_t`` is
exactly the optimizer batch's loss, whatever the cut, the padding or the packing:

- ``loss_normalization = "tokens"``:  L = Σ_s Σ_t CE_{s,t} / N,  N = labelled tokens of the optimizer
  batch, so w_t = 1 / N (transformers >= 4.46's ``num_items_in_batch``);
- ``loss_normalization = "samples"``: L = (1/S) Σ_s (1/n_s) Σ_t CE_{s,t},  n_s = labelled tokens of
  sample s, S = samples with n_s > 0, so w_t = 1 / (S · n_s) (a per-device batch of 1 in older
  transformers, as seeds 000/001 trained).
Classification has one label per sample, so both are the sample mean (w_s = 1/S).

Micro-batches: padded rows (sorted by length inside the optimizer batch, padded to the longest or
to a bucketed width for CUDA graphs), or — ``speed.packing`` — rows of ``max_length`` tokens,
each packing several samples (first fit) with restarting positions, ``micro_batch`` rows per
forward. A CUDA out-of-memory error halves the micro-batch, zeroes the partial gradients and
redoes the step (logged); at micro-batch 1 it stops with what to change.

More than one process (``torchrun``/``accelerate``, ``loralab.distributed``): every rank computes
the weights of the whole optimizer batch, runs only its shard (``distributed.shard``), and the
ranks' gradients are summed (DDP / FSDP2 around the model and its loss, or with
``speed.grad_reduce: "after_backward"`` once after the last backward, outside the CUDA graphs:
``run/reduce.py``), so the step is the one process's step. Micro-batches before the last one
accumulate without communication (``no_sync``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from loralab import distributed
from loralab.config import ConfigError
from loralab.data import collate
from loralab.run.micro_batch import settle_micro_batch
from loralab.run.reduce import all_reduce_grads, broadcast_parameters
from loralab.run.spare_memory import log_transposes
from loralab.speed.attention import MaskedWidths
from loralab.speed.dora_refresh import refresh_dora_norms
from loralab.speed.fast_dora import fast_dora_layers, reusing_dora_norms
from loralab.speed.graphs import GraphedTraining, bucket_width
from loralab.speed.losses import IGNORE_INDEX
from loralab.speed.packing import pack_groups
from loralab.speed.shared_input import clear_input_groups
from loralab.speed.step import causal_lm_loss, prepare_model, rewrite_lines, seq_cls_loss
from loralab.speed_settings import Speed


class MicroBatchOOM(RuntimeError):
    """Out of GPU memory at micro-batch 1: nothing left to shrink."""


def labelled_tokens(feature: dict) -> int:
    """Tokens of a causal-LM sample that carry a loss (its labels after the next-token shift)."""
    labels = feature.get("labels", feature["input_ids"])
    if not isinstance(labels, (list, tuple)):
        return 1  # classification: one label
    return sum(1 for y in labels[1:] if y != IGNORE_INDEX)


def sample_weights(features: list[dict], normalization: str) -> list[float]:
    """Per-sample token weight w_s (see the module docstring); 0 for samples without a label."""
    counts = [labelled_tokens(f) for f in features]
    if normalization == "tokens":
        total = sum(counts)
        return [1.0 / total if total else 0.0] * len(features)
    if normalization == "samples":
        labelled = sum(1 for n in counts if n > 0)
        return [1.0 / (labelled * n) if n > 0 else 0.0 for n in counts]
    raise ValueError(f"loss_normalization = {normalization!r}; allowed: tokens, samples")


@dataclass
class StepStats:
    loss: torch.Tensor
    """The optimizer batch's loss (device scalar; read it only when logging: no host sync)."""
    samples: int
    tokens: int
    """Real (non-pad) input tokens."""


class Step:
    """Callable: ``step(features) -> StepStats``, one optimizer step over ``features`` (the optimizer
    batch, a list of tokenized samples with ``input_ids`` and ``labels``).

    ``kind`` is ``causal_lm`` or ``seq_cls``; ``micro_batch`` the samples (packed: rows of
    ``max_length`` tokens) per forward, None for all at once; ``graphs`` replays CUDA graphs
    (``speed/graphs.py``), else the same calls run eagerly. ``log`` receives one line per event
    (micro-batch shrunk after an OOM). ``wrapped``: the model under DDP/FSDP2
    (``distributed.wrap(model, loss_function(kind))``) when more than one process trains; each
    rank then runs its shard of ``features`` and ``StepStats.loss`` is the whole batch's loss.
    ``reduce_after_backward`` (more than one process, no wrapper: ``speed.grad_reduce``): the same
    shards, the gradients summed over ranks after the last micro-batch (``run/reduce.py``), so
    ``graphs`` may stay on. ``dora_norms``: fast DoRA's weight norms are computed once per step, before
    its first micro-batch, and read by every micro-batch (``speed.dora_norm_per_step``,
    ``speed/dora_refresh.refresh_dora_norms``; ``dora_norms_backend``: its torch.compile backend, None: eager).
    ``foreach_grads``: ``GraphedTraining``'s (``speed.foreach_grad_add``).
    """

    def __init__(self, model, optimizer, *, kind: str, normalization: str, micro_batch: int | None,
                 packing: bool, max_length: int, pad_to: int | None, pad_id: int, device: torch.device,
                 graphs: bool, max_grad_norm: float, log: Callable[[str], None] = print, wrapped=None,
                 reduce_after_backward: bool = False, dora_norms: bool = False, dora_norms_backend=None,
                 foreach_grads: bool | str = False):
        if wrapped is not None and reduce_after_backward:
            raise ValueError("Step: a DDP/FSDP wrapper reduces gradients itself; reduce_after_backward needs none")
        self.model, self.optimizer, self.kind = model, optimizer, kind
        self.normalization, self.micro_batch, self.packing = normalization, micro_batch, packing and kind == "causal_lm"
        self.max_length, self.pad_to, self.pad_id, self.device = max_length, pad_to, pad_id, device
        self.bucket, self.log = graphs, log
        self._guarded = MaskedWidths(device, graphs, log)  # off the widths where cuDNN's SDPA gives NaN
        self.wrapped, self.reduce_after_backward = wrapped, reduce_after_backward
        self.data_parallel = wrapped is not None or reduce_after_backward  # each rank runs its shard
        self.dora_norms = dora_norms
        before = (lambda: refresh_dora_norms(model, dora_norms_backend)) if dora_norms else None
        if wrapped is not None:  # DDP/FSDP2 hooks run in the wrapper's forward; no CUDA graphs
            self.trainer = GraphedTraining(wrapped, optimizer, lambda m, b: m(b)[0], max_grad_norm=max_grad_norm,
                                           enabled=False, before_step=before)
        else:
            loss = loss_function(kind)
            self.trainer = GraphedTraining(model, optimizer, lambda m, b: loss(m, b)[0],
                                           max_grad_norm=max_grad_norm, enabled=graphs, before_step=before,
                                           foreach_grads=foreach_grads)
        self.oom_retries = 0

    # -- building micro-batches ------------------------------------------------------------
    def plan(self, features: list[dict]) -> list[dict]:
        """The micro-batches (host tensors, with ``loss_weights``) of one optimizer batch."""
        weights = sample_weights(features, self.normalization)
        if self.data_parallel:  # weights of the whole batch, samples of this rank
            features, weights = distributed.shard(features, weights)
        if self.packing:
            return self._packed(features, weights)
        order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
        size = self.micro_batch or len(features)
        return [self._padded([features[i] for i in order[k:k + size]], [weights[i] for i in order[k:k + size]])
                for k in range(0, len(order), size)]

    def _padded(self, feats: list[dict], weights: list[float]) -> dict:
        longest = max(len(f["input_ids"]) for f in feats)
        width = self.pad_to or (bucket_width(longest) if self.bucket else longest)
        # cut at the set width (pad_to) even where the guard pads wider
        batch = collate(feats, self.pad_id, self._guarded(width, feats), cut=width)
        w = torch.tensor(weights, dtype=torch.float32)
        # per-token weights over each row's tokens (token labels), else one weight per sample
        batch["loss_weights"] = batch["attention_mask"] * w[:, None] if batch["labels"].dim() == 2 else w
        return batch

    def _packed(self, features: list[dict], weights: list[float]) -> list[dict]:
        width = self.max_length
        lengths = [min(len(f["input_ids"]), width) for f in features]
        rows = pack_groups(lengths, width, seed=None)  # first fit, in data order
        per_forward = self.micro_batch or len(rows)
        out = []
        for k in range(0, len(rows), per_forward):
            chunk = rows[k:k + per_forward]
            longest = max(sum(lengths[i] for i in row) for row in chunk)
            if self.bucket:
                # CUDA graphs replay fixed shapes: rows max_length wide and a power-of-two row count
                # (zero-weight filler rows), so an epoch needs a handful of graphs, not one per step
                row_width, n_rows = width, 1 << (len(chunk) - 1).bit_length()
            else:
                row_width, n_rows = longest, len(chunk)
            row_width = self._guarded(row_width) if any(len(row) > 1 for row in chunk) else row_width  # masked rows
            ids = torch.full((n_rows, row_width), self.pad_id, dtype=torch.long)
            labels = torch.full((n_rows, row_width), IGNORE_INDEX, dtype=torch.long)
            positions = torch.arange(row_width).repeat(n_rows, 1)  # filler: its own positions, no loss
            w = torch.zeros((n_rows, row_width), dtype=torch.float32)
            for r, row in enumerate(chunk):
                at = 0
                for i in row:
                    n = lengths[i]
                    f = features[i]
                    ids[r, at:at + n] = torch.tensor(f["input_ids"][:n])
                    lab = torch.tensor(list(f.get("labels", f["input_ids"]))[:n])
                    lab[0] = IGNORE_INDEX  # not predicted from the previous sample's last token
                    labels[r, at:at + n] = lab
                    positions[r, at:at + n] = torch.arange(n)
                    w[r, at:at + n] = weights[i]
                    at += n
                if at < row_width:
                    positions[r, at:] = torch.arange(row_width - at)
            batch = {"input_ids": ids, "labels": labels, "position_ids": positions, "loss_weights": w}
            if all(len(row) == 1 for row in chunk):
                # one sample per row: plain causal attention is exact (real tokens never attend to the
                # filler after them, which has no loss), and without position_ids transformers keeps
                # SDPA's causal kernel instead of building a mask (13 % of an 8B step when masked)
                del batch["position_ids"]
            out.append(batch)
        return out

    # -- the step ----------------------------------------------------------------------------
    def __call__(self, features: list[dict]) -> StepStats:
        with reusing_dora_norms() if self.dora_norms else contextlib.nullcontext():
            return self._step(features)

    def _step(self, features: list[dict]) -> StepStats:
        tokens = sum(len(f["input_ids"]) for f in features)
        while True:
            try:
                total = torch.zeros((), device=self.device)
                self.trainer.begin()  # A and B are fixed from here to the optimizer step
                if self.wrapped is not None:
                    return self._distributed(features, tokens, total)
                for batch in self.plan(features):
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                    total += self.trainer.micro(batch, 1.0)
                if self.reduce_after_backward:  # between the captured backward and the captured step
                    all_reduce_grads(self.trainer.params, every_grad_present=self.trainer.graphed)
                    distributed.sum_(total)
                self.trainer.step()
                return StepStats(total, len(features), tokens)
            except torch.OutOfMemoryError as exc:
                if self.data_parallel:  # a retry on one rank alone would leave the others waiting
                    raise MicroBatchOOM(f"out of GPU memory at micro-batch {self.micro_batch} on rank "
                                        f"{distributed.current().rank}: with more than one process the "
                                        "micro-batch is not shrunk; set speed.micro_batch lower") from exc
                self._shrink(features, exc)

    def _distributed(self, features: list[dict], tokens: int, total: torch.Tensor) -> StepStats:
        """This rank's shard; gradients summed over ranks on the last micro-batch's backward."""
        batches = self.plan(features)
        for k, batch in enumerate(batches):
            batch = {key: v.to(self.device, non_blocking=True) for key, v in batch.items()}
            with distributed.no_sync(self.wrapped, skip=k < len(batches) - 1):
                total += self.trainer.micro(batch, 1.0)
        self.trainer.step()
        return StepStats(distributed.sum_(total), len(features), tokens)

    def _shrink(self, features: list[dict], exc: Exception) -> None:
        self.trainer.zero_grad()
        clear_input_groups(self.model)  # a forward that raised mid-group keeps its input's graph otherwise (LoRA A's, FP8 trios)
        torch.cuda.empty_cache()
        current = self.micro_batch or len(features)
        longest = max(len(f["input_ids"]) for f in features)
        if current <= 1:
            free, total = torch.cuda.mem_get_info() if torch.cuda.is_available() else (0, 0)
            raise MicroBatchOOM(
                f"out of GPU memory at micro-batch 1 ({'a packed row of ' + str(self.max_length) if self.packing else 'one sample of ' + str(longest)} "
                f"tokens; {total / 2**30:.1f} GiB on the device, {free / 2**30:.1f} GiB free after emptying the cache): "
                "lower max_length, turn on speed.packing for causal LMs, use a bf16 base (dtype: bfloat16) or a "
                f"smaller model. ({str(exc).splitlines()[0][:200]})") from exc
        self.micro_batch = max(1, current // 2)
        self.oom_retries += 1
        self.log(f"out of GPU memory at micro-batch {current} (longest sample {longest} tokens): "
                 f"micro-batch now {self.micro_batch}, step redone")


def loss_function(kind: str) -> Callable:
    """``loss(model, batch) -> (weighted loss sum, count)`` of a task kind (``speed/step.py``)."""
    return causal_lm_loss if kind == "causal_lm" else seq_cls_loss


GRAD_REDUCE_UNDER_FSDP = ("'speed.grad_reduce' = 'after_backward' needs every rank to hold the whole model, which "
                          "--sharding fsdp shards: remove speed.grad_reduce (its default leaves the reduction to the "
                          "DDP or FSDP wrapper) or run with --sharding ddp")


def distributed_speed(speed: Speed, launch, *, rewrites_base: str | None, log: Callable[[str], None]) -> None:
    """What more than one process turns off (in place, logged): CUDA graphs (no collectives in a
    capture) unless ``grad_reduce`` is ``after_backward`` (gradients summed outside the capture);
    under FSDP also compile, the micro-batch probe and mid-run checkpoints. Raises ConfigError under
    FSDP when ``rewrites_base`` names a method whose init rewrites the base weights, or with
    ``grad_reduce: after_backward`` (FSDP2 reduce-scatters sharded gradients itself)."""
    if launch.sharding == "fsdp" and speed.grad_reduce == "after_backward":
        raise ConfigError([GRAD_REDUCE_UNDER_FSDP])
    if speed.grad_reduce == "after_backward":
        log(f"{launch.world_size} processes ({launch.backend}): gradients summed once after each step's backward "
            f"(speed.grad_reduce: after_backward){'; CUDA graphs stay on' if speed.cuda_graphs else ''}")
    elif speed.cuda_graphs:
        log(f"{launch.world_size} processes ({launch.sharding}, {launch.backend}): CUDA graphs off, as DDP/FSDP reduce "
            "gradients from hooks inside the backward, which a graph cannot capture (DDP: speed.grad_reduce "
            "after_backward keeps them)")
        speed.cuda_graphs = False
    else:
        log(f"{launch.world_size} processes ({launch.sharding}, {launch.backend}): gradients summed by its hooks during the backward")
    if launch.sharding != "fsdp":
        return
    if rewrites_base is not None:
        raise ConfigError([(f"method {rewrites_base} rewrites the base weights, which FSDP shards; "
                            "run it with DDP (loralab run --sharding ddp)")])
    if speed.compile:
        log("compile off under FSDP (regional compile of sharded layers is not supported here)")
        speed.compile = False
    if speed.micro_batch == "auto":
        log("micro-batch: no probe under FSDP; the experiment's batch_size (set speed.micro_batch to change)")
        speed.micro_batch = None
    if speed.fp8_transpose_cache not in (0, "auto"):
        log("speed.fp8_transpose_cache off under FSDP (the cached codes are a buffer, which FSDP does not shard)")
    speed.fp8_transpose_cache = 0.0
    speed.fp8_fused_qkv = False  # quietly, as its default is on for every base: a trio's codes are one unsharded buffer
    log("no mid-run checkpoints under FSDP: the adapter/model is gathered and written at the end")


def make_step(model, optimizer, *, speed: dict | Speed, kind: str, dtype: str, device: torch.device, features: list[dict],
              batch_size: int, limit: int, max_length: int, pad_id: int, normalization: str = "tokens",
              pad_to: int | None = None, max_grad_norm: float = 0.0, launch=None, rewrites_base: str | None = None,
              remake_optimizer: Callable | None = None, log: Callable[[str], None] = print) -> tuple[Step, Speed]:
    """The one factory of a run's step: resolve ``speed`` for this device, task ``kind`` and base
    ``dtype`` (``Speed.resolve``; a dict holds an experiment's ``speed`` keys), turn off what more
    than one process cannot do (``distributed_speed``), prepare the model (``speed.step.prepare_model``),
    wrap it under DDP/FSDP2 (``launch``: a ``distributed.Launch``; None or one process: no wrap),
    settle ``micro_batch`` and spend what it leaves of the budget (``run.micro_batch.settle_micro_batch``: CUDA
    "auto" probed over ``features`` up to ``limit`` samples within ``memory_fraction`` of the GPU with
    ``optimizer``'s state to come counted, the smallest over ranks; an explicit size kept, measured once where
    ``fp8_transpose_cache`` "auto" needs its peak; None: ``batch_size``; the choice and why in
    ``resolved.micro_batch_probe``) and build the ``Step``.

    ``optimizer`` is the method's optimizer; under FSDP the parameters change (DTensors) and
    ``remake_optimizer()`` builds it again (``Step.optimizer`` is then the new one).
    Returns (step, resolved settings, no "auto" left).
    """
    settings = speed if isinstance(speed, Speed) else Speed(**speed)
    resolved = settings.resolve(device_type=device.type, kind=kind, base_dtype=dtype)
    multi = launch is not None and launch.distributed
    if multi:
        distributed_speed(resolved, launch, rewrites_base=rewrites_base, log=log)
    prepare_model(model, resolved)
    log_transposes(resolved, log)
    for line in rewrite_lines(resolved, settings):
        log(line)
    wrapped = None
    after_backward = multi and resolved.grad_reduce == "after_backward"
    if after_backward:
        broadcast_parameters(model)  # rank 0's init everywhere, as DDP's wrap does
    elif multi:
        autocast = getattr(torch, resolved.autocast) if resolved.autocast else None
        wrapped = distributed.wrap(model, loss_function(kind), launch, device, compute_dtype=autocast)
        if launch.sharding == "fsdp" and remake_optimizer is not None:  # parameters are DTensors now
            optimizer = remake_optimizer()
    dora_layers, norms_backend = 0, resolved.compile_backend if resolved.compile else None  # compiled as the layers
    if resolved.dora_norm_per_step and multi and launch.sharding == "fsdp" and fast_dora_layers(model):
        log("speed.dora_norm_per_step off under FSDP (the norm needs every rank's whole weights outside the forward)")
        resolved.dora_norm_per_step = False
    elif resolved.dora_norm_per_step:  # after the broadcast (rank 0's weights); tensors allocated before any capture
        dora_layers = refresh_dora_norms(model, norms_backend)  # 0: no DoRA, or peft's own DoRA forward
    if dora_layers:
        log(f"speed.dora_norm_per_step: DoRA's weight norm computed once per optimizer step, not per micro-batch, "
            f"for {dora_layers} layer adapter(s)")
    micro = settle_micro_batch(model, resolved, settings, kind=kind, features=features, batch_size=batch_size,
                               limit=limit, max_length=max_length, pad_id=pad_id, device=device, optimizer=optimizer,
                               dora_layers=dora_layers, log=log)
    step = Step(model, optimizer, kind=kind, normalization=normalization, micro_batch=micro, packing=resolved.packing,
                max_length=max_length, pad_to=pad_to, pad_id=pad_id, device=device, graphs=resolved.cuda_graphs,
                max_grad_norm=max_grad_norm, log=log, wrapped=wrapped, reduce_after_backward=after_backward,
                dora_norms=dora_layers > 0, dora_norms_backend=norms_backend if dora_layers else None,
                foreach_grads=resolved.foreach_grad_add)
    resolved.foreach_grad_add = step.trainer.foreach_grads  # "auto" settled by the model's sizes; False unless graphed
    if step.trainer.foreach_grads or settings.foreach_grad_add is True:
        log("speed.foreach_grad_add: " + (f"each micro-batch's gradients added with one foreach add per dtype "
            f"({len(step.trainer.params)} trainable tensors)" if step.trainer.foreach_grads else
            "NOTHING: no graphed step here (CPU, or a DDP/FSDP wrapper), so autograd adds the gradients"))
    resolved.masked_width_guard = step._guarded.on  # speed/attention.py (pytorch/pytorch#196678)
    return step, resolved
