"""CUDA graphs for the training step: each batch shape's forward + backward captured once and
replayed, and the optimizer step (clipping, AdamW, zeroing) captured once.

Why: at GLUE lengths roberta-base does ~5 ms of GPU work per step of 32 sentences but launches
over a thousand small kernels (every LoRA layer adds its own), so eager PyTorch is bound by the
CPU that launches them (the H100 profile in results/bench: 4.6 ms of GPU work in 430 ms of wall
time with torch.compile recompiling, ~40 ms without). A replayed graph launches all of them in one
call. Large models gain less but still lose the gaps between launches (11 % idle on Llama-3-8B).

How it stays exact:
- gradients live in fixed buffers (allocated once, zeroed by the captured optimizer step) and
  each micro-batch's gradients are added into them (for adapters ``backward_into``: one foreach add,
  where autograd's own accumulation launches one add per parameter), so gradient accumulation works unchanged;
- the micro-batch weight (``len(batch) / samples in the step``) is a device scalar filled before
  each replay, not a constant baked into the graph;
- the optimizer is made ``capturable`` with its learning rate held in a device tensor, which
  torch's LR schedulers fill in place, so the schedule is followed; its state is created before
  capture by a step at learning rate 0 on zero gradients (no parameter moves) whose step count is
  then reset, so the first real step is AdamW's first step;
- warm-up passes before a capture run with weight 0 (they add nothing to the gradients), and
  they run with transformers told that a capture is under way (``_as_if_capturing``): while
  capturing, transformers builds attention masks without looking at the data (no host sync), and
  the warm-up must take that same path, or torch.compile'd layers would meet a new input (a mask
  instead of None) inside the capture and recompile there, which a capture cannot survive.
Shapes must repeat for replay to pay: callers bucket padded widths (``bucket_width``). Anything
the capture cannot take stops the run with an error that names the switch (``speed.cuda_graphs``,
``loralab bench --no-cuda-graphs``): a failed capture leaves CUDA's random-number state unusable,
so an eager fallback in the same process is not safe. Optimizers torch cannot capture (e.g. peft's
LoRA-FA optimizer) step eagerly, and shapes beyond ``max_graphs`` run eagerly.

torch's ``make_graphed_callables`` graphs a module's forward/backward but not the optimizer, and
``torch.compile(mode="reduce-overhead")`` recompiles per width and breaks on peft's Python-level
dispatch; a whole-step capture of our own step is what removes every launch.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

# Optimizers whose state ``_prepare_optimizer`` can create without changing the first real step
# (Adam's moments start at 0 either way; SGD's momentum buffer would not start at the gradient).
CAPTURABLE_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam)


@contextlib.contextmanager
def _as_if_capturing():
    """transformers' ``is_tracing`` answers True (as it does inside a capture) for the duration."""
    try:
        from transformers.utils import import_utils
    except ImportError:  # no transformers: nothing to align
        yield
        return
    original = getattr(import_utils, "is_cuda_stream_capturing", None)
    if original is None:
        yield
        return
    import_utils.is_cuda_stream_capturing = lambda: True
    try:
        yield
    finally:
        import_utils.is_cuda_stream_capturing = original


def bucket_width(n: int) -> int:
    """The padded width for a batch whose longest row has ``n`` tokens.

    Multiples of 16 up to 128 (GLUE sentences), of 64 up to 1,024, then of 256: few distinct
    shapes (each one costs a capture), at most 16 / 64 / 256 pad tokens per row.
    """
    if n <= 0:
        raise ValueError(f"width {n!r}: must be positive")
    step = 16 if n <= 128 else 64 if n <= 1024 else 256
    return -(-n // step) * step


def _shape_key(batch: dict) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))


# The largest share of the model's bytes (parameters and buffers) that its trainable tensors may hold for the
# graphed step to take their gradients together (``backward_into``): adapters hold ~1 % at Llama-3-8B, r 32; full
# fine-tuning holds all of it, and its gradients alive together until the add would double their memory.
FOREACH_GRAD_SHARE = 1 / 8


def takes_foreach_grads(model: torch.nn.Module, params: list[torch.Tensor]) -> bool:
    """Whether the trainable ``params`` hold at most ``FOREACH_GRAD_SHARE`` of ``model``'s parameter and buffer
    bytes: then ``backward_into`` may hold their gradients alive together (the graphed step's choice)."""
    trainable = sum(p.numel() * p.element_size() for p in params)
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    return trainable <= FOREACH_GRAD_SHARE * total


def backward_into(loss: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Add ``d loss / d p`` into each ``p.grad`` of ``params`` (every one a tensor already: the fixed buffers of a
    graphed run), as ``loss.backward()`` accumulates into existing gradients: the same float sums, bitwise, and
    a parameter the loss does not reach keeps its buffer. Raises ValueError where a parameter that the loss
    reaches has no buffer (``p.grad`` None), naming its shape.

    Why not ``backward()``: autograd adds each parameter's gradient into its buffer with its own kernel as the
    gradient is made, one launch per parameter (at Llama-3-8B, r 32, all-linear, one micro-batch a step: 672 for
    DoRA's factors and magnitudes among 676 float32 adds, ~2 us each, 1.39 ms of a 105 ms FP8-base step in
    results/bench-fair-h100-1207f's profile); here the
    gradients are returned (``torch.autograd.grad``) and added by one ``torch._foreach_add_`` per device and
    dtype (the multi-tensor kernels take one device and dtype a launch), a few kernels in all. The gradients
    are then alive together until the add: the graphed step does this only where the trainable tensors are
    small (``takes_foreach_grads``; ~0.34 GB fp32 at that shape, at the end of the backward, below the
    step's peak).
    """
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    groups: dict[tuple, tuple[list, list]] = {}
    for p, grad in zip(params, grads, strict=True):
        if grad is None:
            continue
        if p.grad is None:
            raise ValueError(f"backward_into: a parameter of shape {tuple(p.shape)} has no gradient buffer "
                             "(p.grad is None); it adds into existing buffers only")
        buffers, added = groups.setdefault((p.grad.device, p.grad.dtype), ([], []))
        buffers.append(p.grad)
        added.append(grad)
    for buffers, added in groups.values():
        torch._foreach_add_(buffers, added)


class GraphedTraining:
    """Micro-steps and optimizer steps of one training run, replayed from CUDA graphs.

    ``loss_fn(model, batch)`` returns the mean loss of a micro-batch (a scalar tensor).
    ``begin()`` runs ``before_step`` (None: nothing), work due once per optimizer step before its
    micro-batches that writes only into tensors it allocated on an earlier call (fast DoRA's norms:
    ``refresh_dora_norms``); graphed, its first call runs eagerly and the second is captured, later
    ones replay. ``micro(batch, weight)`` backpropagates ``weight * loss`` (accumulating) and returns the loss,
    detached, without a host sync; ``step()`` clips (``max_grad_norm`` > 0), steps the optimizer
    and zeroes the gradients. With ``enabled`` False or on CPU the same calls run eagerly;
    ``graphed`` says which. ``foreach_grads`` (graphed only; ``speed.foreach_grad_add``): True adds each
    micro-batch's gradients by ``backward_into``, "auto" where ``takes_foreach_grads``, False by ``backward()``;
    ``self.foreach_grads`` says which.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor], *, max_grad_norm: float = 0.0,
                 enabled: bool = True, max_graphs: int = 32, warmup: int = 2,
                 before_step: Callable[[], object] | None = None, foreach_grads: bool | str = False):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.before_step, self._begin_graph, self._begun = before_step, None, False
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        self.max_graphs, self.warmup = max_graphs, warmup
        device = self.params[0].device if self.params else torch.device("cpu")
        self.graphed = bool(enabled and device.type == "cuda" and self.params)
        self.graph_optimizer = self.graphed and type(optimizer) in CAPTURABLE_OPTIMIZERS
        self.foreach_grads = self.graphed and (takes_foreach_grads(model, self.params) if foreach_grads == "auto"
                                               else bool(foreach_grads))
        self._micro: dict[tuple, tuple] = {}
        self._step_graph = None
        if self.graphed:
            self._pool = torch.cuda.graph_pool_handle()
            # One side stream for every capture's warm-up: cuBLAS keeps a workspace (32 MiB on Hopper, in
            # the caching allocator, never freed) per stream it runs on, so a stream per captured shape
            # would add one per bucket width (up to max_graphs) to the run's memory.
            self._side = torch.cuda.Stream(device=device)
            self._weight = torch.zeros((), device=device)
            for p in self.params:  # fixed gradient buffers that every captured backward adds into
                p.grad = torch.zeros_like(p)
            if self.graph_optimizer:
                self._prepare_optimizer(device)

    # -- optimizer --------------------------------------------------------------------------
    def _prepare_optimizer(self, device, capturable: bool = True):
        """Capturable groups with device learning rates, and state created without moving weights."""
        opt = self.optimizer
        for group in opt.param_groups:
            group["capturable"] = capturable
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        if all(p in opt.state and opt.state[p] for p in self.params):
            # resumed from a checkpoint: the state exists; only its step counts must live on the device
            for state in opt.state.values():
                if "step" in state and not (isinstance(state["step"], torch.Tensor) and state["step"].device == device):
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device=device).clone()
            return
        lrs = [group["lr"].clone() for group in opt.param_groups]
        for group in opt.param_groups:
            group["lr"].zero_()
        opt.step()  # zero gradients and lr 0: moments stay 0, parameters and decay unchanged
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"].copy_(lr)
        for state in opt.state.values():
            if "step" in state and isinstance(state["step"], torch.Tensor):
                state["step"].zero_()

    def _eager_step(self):
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        if self.graphed:
            torch._foreach_zero_([p.grad for p in self.params])
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        """Drop accumulated gradients (a step abandoned after an out-of-memory error)."""
        if self.graphed:
            torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])
        else:
            for p in self.params:
                p.grad = None

    def step(self) -> None:
        if not self.graph_optimizer:
            return self._eager_step()
        if self._step_graph is None:
            self._step_graph = self._capture_call(self._eager_step, f"optimizer step ({type(self.optimizer).__name__})")
        self._step_graph.replay()

    def _capture_call(self, fn: Callable[[], object], what: str) -> torch.cuda.CUDAGraph:
        """A CUDA graph of ``fn()`` in the shared pool (captured, not run); a failed capture raises ``_failure``."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                fn()
            return graph
        except RuntimeError as exc:
            raise self._failure(what, exc) from exc

    def begin(self) -> None:
        """``before_step`` ahead of a step's micro-batches (class docstring)."""
        if self.before_step is None:
            return
        if not self.graphed or not self._begun:  # the eager first call allocates what later calls write into
            self._begun = True
            self.before_step()
            return
        if self._begin_graph is None:
            self._begin_graph = self._capture_call(self.before_step, "work before the step (before_step)")
        self._begin_graph.replay()

    # -- micro-steps -------------------------------------------------------------------------
    def _eager_micro(self, batch: dict, weight) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        if self.foreach_grads:  # the fixed buffers: one foreach add (backward_into says why)
            backward_into(loss * weight, self.params)
        else:
            (loss * weight).backward()
        return loss.detach()

    def micro(self, batch: dict, weight: float = 1.0) -> torch.Tensor:
        if not self.graphed:
            return self._eager_micro(batch, weight)
        key = _shape_key(batch)
        entry = self._micro.get(key)
        if entry is None:
            if len(self._micro) >= self.max_graphs:
                return self._eager_micro(batch, weight)
            entry = self._capture(batch, key)
        graph, inputs, loss = entry
        for name, value in batch.items():
            inputs[name].copy_(value, non_blocking=True)
        self._weight.fill_(weight)
        graph.replay()
        return loss.clone()

    def _capture(self, batch: dict, key: tuple):
        inputs = {name: value.clone() for name, value in batch.items()}
        self._weight.zero_()  # warm-up passes add 0 * gradient
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side), _as_if_capturing():
                for _ in range(self.warmup):
                    self._eager_micro(inputs, self._weight)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                loss = self._eager_micro(inputs, self._weight)
        except RuntimeError as exc:
            raise self._failure(f"forward/backward of shapes {[tuple(v.shape) for v in batch.values()]}", exc) from exc
        self._micro[key] = (graph, inputs, loss)
        return self._micro[key]

    @staticmethod
    def _failure(what: str, exc: Exception) -> RuntimeError:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return RuntimeError(f"CUDA graph capture of the {what} failed: {first}. Run without CUDA graphs: "
                            "set \"speed\": {\"cuda_graphs\": false} in training_parameters.json "
                            "(loralab bench: --no-cuda-graphs).")

    @property
    def graphs(self) -> int:
        """Number of captured graphs beside the optimizer step's: the micro-steps' and the before-step
        work's (a change marks a step as not steady: ``run/meter.py``; for logs and the bench)."""
        return len(self._micro) + (self._begin_graph is not None)
