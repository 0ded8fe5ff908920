"""More than one process: the launch (torchrun / accelerate), the data shard of each rank, DDP and
FSDP2 wrapping, rank-0 gating, and the collectives the run needs.

loralab starts no processes of its own: ``torchrun --nproc_per_node N -m loralab run DIR`` or
``accelerate launch -m loralab run DIR`` start one process per GPU and set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``); ``init`` reads them and
joins the process group (NCCL on CUDA, gloo on CPU). Without them (or with ``WORLD_SIZE=1``)
nothing here changes a single-process run.

Exact optimizer batches on N ranks. The data order is a fixed function of (seed, epoch)
(``run.loop.epoch_batches``), so every rank holds the whole optimizer batch and computes every
sample's token weight w from it (``loralab.run.step.sample_weights``: 1/N_tokens, or 1/(S·n_s)).
Each rank then runs only its shard (``shard``: samples sorted by length and dealt round-robin,
so ranks get near-equal tokens) and backpropagates Σ_shard w·CE. The gradients are **summed**
across ranks (DDP with a sum communication hook, FSDP2 with a gradient divide factor of 1), so
the optimizer sees Σ_ranks Σ_shard w·∇CE = ∇L of the whole optimizer batch: the same step as one
process, whatever N, the micro-batch or the packing, with no reduction of token counts. (DDP's
default averages; scaling the loss by N instead would be exact only when N is a power of two.)

DDP wraps the model *and its loss* (``LossModule``): the fused chunked loss and the speed options run
unchanged inside DDP's forward. CUDA graphs capture no collectives: off under DDP and FSDP (logged).

Upstream: torch.nn.parallel.DistributedDataParallel (communication hooks:
torch/distributed/algorithms/ddp_comm_hooks), torch.distributed.fsdp.fully_shard (FSDP2),
torch.distributed.checkpoint.state_dict (gathering a sharded state).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

SHARDINGS = ("ddp", "fsdp")
TIMEOUT_ENV = "LORALAB_DIST_TIMEOUT_MIN"
"""Minutes a collective may wait (default 60): rank 0 alone evaluates or writes while the others
wait at the next collective."""


@dataclass(frozen=True)
class Launch:
    """Where this process stands. ``backend`` is None for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    sharding: str = "ddp"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def record(self, micro_batch, optimizer_batch: int | None = None) -> dict:
        """What the result records about the launch; ``micro_batch_per_rank``: the most samples (packed: rows)
        one forward on a rank holds, ``micro_batch`` capped by a rank's share of ``optimizer_batch``."""
        if micro_batch is not None and optimizer_batch:
            micro_batch = min(micro_batch, -(-optimizer_batch // self.world_size))  # a share: ceil(batch / world)
        return {"world_size": self.world_size, "backend": self.backend,
                "sharding": self.sharding if self.distributed else None, "micro_batch_per_rank": micro_batch}


_LAUNCH = Launch()


def launch_from_env(environ=None) -> Launch:
    """The launch described by torchrun's / accelerate's variables (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``); a single process when they are absent. Raises ValueError naming the variable
    for values that are not integers or out of range. Does not join a process group."""
    env = os.environ if environ is None else environ

    def number(name: str, default: int) -> int:
        raw = env.get(name)
        if raw in (None, ""):
            return default
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name} = {raw!r}: must be an integer") from None

    world = number("WORLD_SIZE", 1)
    rank = number("RANK", 0)
    local = number("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK = {rank}, WORLD_SIZE = {world}: need 0 <= RANK < WORLD_SIZE")
    return Launch(rank=rank, world_size=world, local_rank=local)


def init(device: str = "auto", sharding: str = "ddp") -> Launch:
    """Join the process group of this launch (once per process) and return it.

    ``device`` is the experiment's ``device`` (``auto``, ``cuda``, ``cpu``): NCCL on CUDA (this
    process's GPU is ``cuda:LOCAL_RANK``), gloo on CPU. ``sharding``: ``ddp`` (every rank holds the
    whole model) or ``fsdp`` (FSDP2 shards parameters, gradients and optimizer state).
    Raises ValueError for an unknown ``sharding``.
    """
    global _LAUNCH
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding = {sharding!r}; allowed: {', '.join(SHARDINGS)}")
    launch = launch_from_env()
    if not launch.distributed:
        _LAUNCH = Launch(sharding=sharding)
        return _LAUNCH
    cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(launch.local_rank)
        minutes = float(os.environ.get(TIMEOUT_ENV, "60"))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=minutes),
                                **({"device_id": torch.device("cuda", launch.local_rank)} if cuda else {}))
    _LAUNCH = Launch(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=launch.local_rank,
                     backend=dist.get_backend(), sharding=sharding)
    if not _LAUNCH.is_main:  # progress bars on rank 0 only (transformers' own; loralab's check is_main)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return _LAUNCH


def current() -> Launch:
    """The launch ``init`` joined (a single process before that)."""
    return _LAUNCH


def device_for(name: str) -> torch.device:
    """The experiment's ``device`` for this rank: ``cuda`` means this rank's GPU."""
    launch = current()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and launch.distributed:
        return torch.device("cuda", launch.local_rank)
    return device


def is_main() -> bool:
    return current().is_main


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (end of ``loralab run``)."""
    global _LAUNCH
    if dist.is_initialized():
        dist.destroy_process_group()
    _LAUNCH = Launch()


# -- collectives on host values ----------------------------------------------------------------
def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (picklable)."""
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _device() -> torch.device:
    return torch.device("cuda", current().local_rank) if current().backend == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a collective: every rank must call it)."""
    if not current().distributed:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` of all ranks (e.g. a probed micro-batch, so every rank uses one)."""
    if not current().distributed:
        return value
    t = torch.tensor([int(value)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns ``tensor``. No host sync for a tensor on this rank's
    collective device; a CPU tensor under NCCL travels through this rank's GPU and back."""
    if not current().distributed:
        return tensor
    dev = _device()
    if dev.type == "cuda" and tensor.device != dev:
        moved = tensor.to(dev)
        dist.all_reduce(moved)
        tensor.copy_(moved)
    else:
        dist.all_reduce(tensor)
    return tensor


# -- the optimizer batch's shard ----------------------------------------------------------------
def shard(features: Sequence[dict], weights: Sequence[float], launch: Launch | None = None
          ) -> tuple[list[dict], list[float]]:
    """This rank's samples of one optimizer batch, with their (global) token weights.

    Samples are sorted by length (longest first, ties by position) and dealt round-robin, so every
    rank gets near-equal tokens; together the ranks hold every sample exactly once. A rank left
    without a sample (an optimizer batch smaller than the world) gets the first sample with weight
    0: it still runs one backward, so the gradient sum has every rank (DDP/FSDP wait for it).
    """
    launch = launch or current()
    if not launch.distributed:
        return list(features), list(weights)
    order = sorted(range(len(features)), key=lambda i: (-len(features[i]["input_ids"]), i))
    mine = order[launch.rank::launch.world_size]
    if not mine:
        return [features[0]], [0.0]
    return [features[i] for i in mine], [weights[i] for i in mine]


def gather_in_order(fn: Callable[[list], list], items: Sequence) -> list:
    """``fn(items)`` computed data-parallel: rank r runs ``fn`` on ``items[r::world]`` (one output per
    item, picklable), and every rank gets all outputs in input order. For generation/prediction
    loops whose outputs are then scored once (the same metrics as one process). One process or
    FSDP: ``fn(items)`` on every rank."""
    launch = current()
    if not splits_work():
        return list(fn(list(items)))
    mine = list(fn(list(items[launch.rank::launch.world_size])))
    if len(mine) != len(items[launch.rank::launch.world_size]):
        raise ValueError(f"gather_in_order: fn returned {len(mine)} outputs for "
                         f"{len(items[launch.rank::launch.world_size])} inputs")
    parts = [None] * launch.world_size
    dist.all_gather_object(parts, mine)
    out = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::launch.world_size] = part
    return out


def splits_work() -> bool:
    """Whether ranks may run different forwards: DDP (each holds the model), not FSDP (every
    forward gathers parameters from all ranks, so all must run the same ones)."""
    launch = current()
    return launch.distributed and launch.sharding == "ddp"


def share(items: Sequence) -> list:
    """This rank's items of an evaluation loop (``items[rank::world]``) under DDP; all of them for
    one process or FSDP. Pair with ``merge_shared``. E.g. in a generation loop over batches:
    ``batches = distributed.share(batches)`` ... ``results = distributed.merge_shared(results)``."""
    launch = current()
    return list(items[launch.rank::launch.world_size]) if splits_work() else list(items)


def merge_shared(results: list[list]) -> list[list]:
    """Every rank's ``results`` (one list per input; empty where another rank's ``share`` held the
    input) merged on every rank, in input order. Identity when ``share`` did not split."""
    if not splits_work():
        return results
    mine = {i: r for i, r in enumerate(results) if r}
    parts = [None] * current().world_size
    dist.all_gather_object(parts, mine)
    merged = [list(r) for r in results]
    for part in parts:
        for i, r in part.items():
            merged[i] = r
    return merged


# -- wrapping the model ---------------------------------------------------------------------------
class LossModule(torch.nn.Module):
    """``model`` and its loss as one module: ``forward(batch) = loss_fn(model, batch)``.

    DDP's and FSDP2's hooks run around ``forward``; wrapping the loss too keeps loralab's fused
    chunked LM-head loss and the model's speed options (autocast) exactly as on one GPU.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


def _sum_hook(state, bucket):
    """DDP communication hook: the sum of the ranks' gradients (DDP's default divides by N)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap(model: torch.nn.Module, loss_fn: Callable, launch: Launch | None = None,
         device: torch.device | None = None, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The module the training step calls: ``LossModule(model, loss_fn)``, under DDP or FSDP2.

    DDP: parameters and buffers are broadcast from rank 0 (every rank starts from the same init,
    residual base weights included); gradients are summed (``_sum_hook``). FSDP2: every module
    class named in the model's ``_no_split_modules`` (its decoder layers) is one shard group, the
    rest (embeddings, final norm, LM head) the root's; gradients are summed (divide factor 1).
    ``compute_dtype`` (the run's autocast dtype, bf16/fp16): parameters are gathered in it and
    gradients reduced in fp32 (``MixedPrecisionPolicy``), the compute autocast does on one GPU;
    None gathers them as stored. Parameters become DTensors: build the optimizer after this call.
    ``model`` is not copied. Raises ValueError (FSDP) for a model naming no layer classes.
    """
    launch = launch or current()
    module = LossModule(model, loss_fn)
    if launch.sharding == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        cuda = device is not None and device.type == "cuda"
        # buffers (rotary tables, position ids) are the same on every rank: no sync in each forward
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        ddp = DDP(module, device_ids=[device.index if device.index is not None else launch.local_rank] if cuda else None,
                  gradient_as_bucket_view=True, **no_buffer_sync)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cuda" if device is not None and device.type == "cuda" else "cpu", (launch.world_size,))
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(hf, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"FSDP: {type(hf).__name__} names no layer classes in _no_split_modules; "
                         "use DDP (loralab run --sharding ddp)")
    groups = [m for m in model.modules() if type(m).__name__ in names]
    # inputs stay as they are: the batch's fp32 loss weights must not be rounded to bf16
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None,
                                  cast_forward_inputs=False)
    for layer in groups:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    for m in [*groups, module]:  # a plain SUM (gloo has no PREMUL_SUM), divided by 1
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return module


@contextlib.contextmanager
def no_sync(wrapped: torch.nn.Module, skip: bool):
    """DDP: accumulate this micro-batch's gradients without communication (``skip``). FSDP2 always
    reduce-scatters (sums of sharded gradients add up the same; keeping unsharded gradients across
    micro-batches would cost a whole model's gradients per rank). Nothing for a plain module."""
    if skip and hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
    else:
        yield


def is_sharded(wrapped) -> bool:
    return hasattr(wrapped, "set_requires_gradient_sync")


@contextlib.contextmanager
def gathered(wrapped):
    """FSDP2: the root's parameters (embeddings, LM head, final norm) unsharded for the duration, so
    code that calls the inner model directly (generation, evaluation) runs; every rank must enter
    (each layer still gathers its own parameters in its forward). Nothing for DDP or one process."""
    if not is_sharded(wrapped):
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


def full_state_dict(wrapped, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """FSDP2: the whole model's state (CPU tensors, names as in the unwrapped model) on rank 0,
    None on the others; every rank must call. ``trainable_only``: only tensors that train."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not current().is_main:
        return None
    wanted = {n for n, p in wrapped.named_parameters() if p.requires_grad} if trainable_only else None
    out = {}
    for name, value in state.items():
        if wanted is not None and name not in wanted:
            continue
        out[name.removeprefix("model.")] = value
    return out

