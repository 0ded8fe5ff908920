"""``loralab bench``: the peer stacks and ``loralab run``'s training step, side by side on one device.

One row per workload x method x stack (``loralab.bench.workloads`` for the workloads,
``loralab.bench.peers`` for the peer stacks: the docs peer, Liger, and the tuned peer, which runs
after loralab's row and searches its micro-batch within the memory budget loralab's probe had, or with
``--peer-memory peak`` within loralab's measured peak: ``tuned_cap``).
Ratios (``loralab.bench.rows``: ``add_ratios``, the table) are loralab's throughput over the best peer row's (the fastest
of docs peer, Liger and tuned on the same workload and method), with the docs peer's beside it.
loralab: the same model, adapter and optimizer batches through what ``loralab run`` builds with
no ``speed`` keys (``loralab_step``, through ``loralab.run.step.make_step``): ``Speed``'s defaults
for the device, ``prepare_model`` and the ``Step`` (packing into rows of the workload's length for causal LMs, the
auto micro-batch probe, bucketed widths and CUDA graphs, exact token-mean loss, fused AdamW).
Nothing is tuned by hand; ``--no-compile`` / ``--no-cuda-graphs`` are explicit speed keys.

Throughput counts real (non-pad) tokens or samples.
MFU = throughput × FLOPs per token / peak, with 4N FLOPs per token for adapters (frozen base:
forward + input gradients) and 6N for full fine-tuning, N = parameters in matmuls (no embeddings).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time

import torch

from loralab.bench.peers import (
    liger_available,
    liger_options,
    liger_patched,
    peer_batch,
    peer_step,
    tuned_chunks,
    tuned_micro_batch,
    tuned_settings,
    tuned_step,
    wrap,
)
from loralab.bench.rows import add_ratios, format_row
from loralab.bench.timeline import device_intervals, timeline, timeline_text
from loralab.bench.workloads import (
    FP8,
    BenchError,
    Workload,
    build_model,
    float_method,
    is_seq_cls,
    presets,
    step_features,
)
from loralab.run.probe import pending_state_bytes
from loralab.run.step import Step, make_step
from loralab.shapes import MODELS
from loralab.speed.step import _hf_model, budget_partitions, partitions_since
from loralab.speed_settings import FP8_ONLY_SPEED

PEAK_FLOPS = {"cuda": 989e12}  # H100 SXM dense bf16
STACKS = ("peer", "loralab", "liger", "tuned")
"""Every stack a preset row runs on, in the order they run (the tuned peer after loralab: its memory cap)."""
PEER_MEMORY = ("peak", "budget")
"""What the tuned peer's micro-batch search is held to (``tuned_cap``): loralab's measured peak on the same
row, or the budget loralab's probe had (``speed.memory_fraction`` of the card). The budget is the default:
issue 22 asks for the peer's best micro-batch "within the same memory as loralab's run (found
the same way)", and loralab's probe searches within the budget. Held to loralab's peak instead, the peer
loses micro-batches whenever loralab's own memory shrinks: on an H100 at an H200's budget it ran micro-batch 2
(6,511 tokens/s) within loralab's 24.2 GiB peak and 4 (10,136) within its 34.92 GiB budget
(results/bench-fair-h100-1206, calls 2 and 6). Every fair-bench run in results/ before that call 6 held
it to the peak."""


def tuned_cap(ours: dict | None, peer_memory: str = "budget") -> tuple[float | None, str | None]:
    """The tuned peer's memory cap from loralab's row on the same workload and method (``ours``; None:
    no such row, no cap): (GiB, where it came from). ``peer_memory`` "peak": loralab's measured peak;
    "budget" (the default): its probe's budget, or its peak where that is higher (the probe times a
    forward and backward, and micro-batch 1 may run over the budget) or nothing was probed (an
    explicit micro-batch, CPU). An FP8-base row's peers are the float method's, capped by the float
    method's loralab row, which runs before them.
    Raises BenchError for a ``peer_memory`` not in ``PEER_MEMORY``."""
    if peer_memory not in PEER_MEMORY:
        raise BenchError(f"peer memory {peer_memory!r} unknown; allowed: {', '.join(PEER_MEMORY)}")
    if ours is None or ours.get("peak_memory_gib") is None:
        return None, None
    budget = ((ours.get("speed") or {}).get("micro_batch_probe") or {}).get("budget_gib")
    if peer_memory == "budget" and budget is not None and budget >= ours["peak_memory_gib"]:
        return budget, "loralab's memory budget"
    return ours["peak_memory_gib"], "loralab's measured peak"


def matmul_params(model) -> int:
    """Parameters that take part in matmuls per token: all but embeddings (LM head counted)."""
    total = 0
    for name, p in model.named_parameters():
        if "lora_" in name or "embed" in name.lower() or p.dim() < 2:
            continue
        total += p.numel()
    return total


def loralab_step(model, features: list[list[dict]], *, kind: str, dtype: str, max_length: int, batch_size: int,
                 device: str, speed: dict | None = None, learning_rate: float = 1e-5, log=print) -> tuple[Step, dict]:
    """The step ``loralab run`` builds, for an adapted ``model``: ``loralab.run.step.make_step``.

    ``speed`` holds explicit ``speed`` keys (the experiment's; the bench's --no-compile /
    --no-cuda-graphs); every other key is ``loralab.speed_settings.Speed``'s default, resolved for this
    device, task kind and base dtype. The optimizer is the ``adamw`` optimizer part's (fused AdamW
    on CUDA, weight decay 0); then, as in ``loralab run``: ``prepare_model``, the micro-batch probe
    when it is "auto" (over all the row's samples, limit = the optimizer batch), ``Step`` with
    packing into rows of ``max_length``, bucketed widths and CUDA graphs as resolved, token
    normalisation, no clipping. Returns (step, resolved speed settings as the record holds them).
    """
    from loralab.config import build_parameters
    from loralab.methods.lora import ADAMW

    optimizer = ADAMW.make(model, None, build_parameters({"learning_rate": learning_rate, "weight_decay": 0.0}))
    pad_id = getattr(_hf_model(model).config, "pad_token_id", None) or 0
    runner, resolved = make_step(model, optimizer, speed=speed or {}, kind=kind, dtype=dtype, device=torch.device(device),
                                 features=[f for feats in features for f in feats], batch_size=batch_size,
                                 limit=batch_size, max_length=max_length, pad_id=pad_id, log=log)
    return runner, resolved.record()


def check_windows(windows) -> None:
    """Raise BenchError unless ``windows`` (how many times a row times its steps) is a positive int."""
    if not isinstance(windows, int) or windows < 1:
        raise BenchError(f"windows {windows!r}: must be a positive integer")


def run_one(w: Workload, method: str, stack: str, device: str, steps: int, warmup: int,
            speed: dict | None = None, profile_to: list | None = None, budget_gib: float | None = None,
            budget_from: str | None = None, windows: int = 1) -> dict:
    """One row: build the model (the workload's dtype for every stack; float32 on CPU), adapt it,
    time ``steps`` optimizer steps after ``warmup`` ones, ``windows`` times over (``run_bench``). ``speed``: explicit loralab speed keys;
    ``budget_gib``: the tuned peer's memory cap (``tuned_cap``: loralab's peak or budget on this workload
    and method), ``budget_from`` where it came from (recorded in the peer's ``micro_batch_probe``).
    Raises BenchError (a ValueError) for ``windows`` below 1, before the model is built."""
    check_windows(windows)
    dtype = "float32" if device == "cpu" else w.dtype
    clean(device)
    patches = contextlib.ExitStack()
    base = build_model(w, device, getattr(torch, dtype))
    if method.startswith(FP8):  # the frozen base in FP8 before the adapter is built on it, as loralab run does
        if stack != "loralab":
            raise ValueError(f"method {method!r}: only the loralab stack runs an FP8 base")
        from loralab.methods.common import linear_names
        from loralab.methods.fp8base import quantize_linears

        quantize_linears(base, linear_names(base))
        # the fused LoRA matmul reads the float base weight: off, as the run's check asks (fast DoRA reads FP8 codes)
        speed = {**(speed or {}), "fused_lora": False}
    elif speed:  # FP8-only keys: the float rows run without them
        speed = {k: v for k, v in speed.items() if k not in FP8_ONLY_SPEED}
    model = wrap(base, w, float_method(method))
    if stack == "liger" or (stack == "tuned" and liger_available(w, device)):
        # on the adapted model, as trainer_row: liger_options turns the fused loss off if the head is adapted
        patches.enter_context(liger_patched(base, **liger_options(model)))
    reserved = torch.cuda.memory_reserved() / 2**30 if device == "cuda" else None
    with patches:
        row = _run_built(w, model, method, stack, device, dtype, steps, warmup, speed, profile_to, budget_gib,
                         budget_from, windows)
    row["reserved_gib_at_start"] = None if reserved is None else round(reserved, 2)
    return row


def clean(device: str) -> None:
    """Nothing of earlier rows left for the next one: compiled code (which holds its model), CUDA
    graph pools, cached blocks. Called at the start of every row, so also after a failed one."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        # cuBLAS's workspaces (one per stream it ran on, ~32 MiB each on Hopper) live in the caching
        # allocator for the process's life: left alone they count in the next row's peak
        # (pytorch/pytorch#95668; inductor's CUDA graph trees clear them the same way).
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()


def _run_built(w, model, method, stack, device, dtype, steps, warmup, speed, profile_to, budget_gib=None,
               budget_from=None, windows=1) -> dict:
    seq_cls = is_seq_cls(w)
    model.train()
    spec = MODELS[w.model]
    vocab, pad_id = spec["vocab_size"], spec.get("pad_token_id", 0)
    data = step_features(w, vocab, warmup + steps)
    resolved, runner, tuned = None, None, None
    partitions = budget_partitions()  # the probe compiles too
    if stack == "loralab":
        runner, resolved = loralab_step(model, data, kind="seq_cls" if seq_cls else "causal_lm", dtype=dtype,
                                        max_length=w.seq_len, batch_size=w.batch_size, device=device, speed=speed,
                                        log=lambda line: None)
        run = runner
        shape_of = lambda feats: tuple(tuple(tuple(v.shape) for v in b.values()) for b in runner.plan(feats))
        inputs = data
    elif stack == "tuned":
        tuned = tuned_settings(w, device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
        micro, probe = tuned_micro_batch(model, w, [f for feats in data for f in feats], pad_id, device,
                                         tuned["autocast"], budget_gib, limit=w.batch_size,
                                         held=pending_state_bytes(opt) if device == "cuda" else 0,
                                         budget_from=budget_from)
        tuned.update(micro_batch=micro, micro_batch_probe=probe)
        run = lambda chunks: tuned_step(model, opt, chunks, device, tuned["autocast"])
        shape_of = lambda chunks: tuple(tuple(tuple(v.shape) for v in b.values()) for b, _ in chunks)
        inputs = [tuned_chunks(w, feats, pad_id, micro, device) for feats in data]
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        run = lambda b: peer_step(model, opt, b)
        shape_of = lambda b: tuple(tuple(v.shape) for v in b.values())
        inputs = [{k: v.to(device) for k, v in peer_batch(w, feats, pad_id).items()} for feats in data]
    n_params = matmul_params(model)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # Every batch shape is met before timing (a real run meets each of its few shapes once in
    # thousands of steps): compile and graph capture are not timed, for either stack.
    seen, first_of_shape = set(), []
    for item in inputs[warmup:]:
        key = shape_of(item)
        if key not in seen:
            seen.add(key)
            first_of_shape.append(item)
    if device == "cuda":  # peak over warm-up too: graph capture and compile allocate there
        torch.cuda.reset_peak_memory_stats()
    for item in inputs[:warmup] + first_of_shape:
        run(item)
    window_seconds = []
    for _ in range(windows):  # the median window counts (``run_bench``'s ``windows``)
        sync()
        start = time.perf_counter()
        for item in inputs[warmup:]:
            run(item)
        sync()
        window_seconds.append(time.perf_counter() - start)
    seconds = statistics.median_high(window_seconds)  # a window's own time: an even count's slower middle one
    timed = data[warmup:]
    tokens = sum(len(f["input_ids"]) for feats in timed for f in feats)
    units = sum(len(feats) for feats in timed) if seq_cls else tokens
    throughput = units / seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    mfu = None
    if device in PEAK_FLOPS:
        mfu = tokens / seconds * (6 if method == "full" else 4) * n_params / PEAK_FLOPS[device]
    if profile_to is not None and device == "cuda":
        profile_to.append(_profile(run, inputs[warmup:warmup + 2], f"{w.name} {method} {stack}"))
    row = {"workload": w.name, "method": method, "stack": stack, "throughput": round(throughput, 2),
           "unit": "samples/s" if seq_cls else "tokens/s", "peak_memory_gib": None if peak is None else round(peak, 2),
           "mfu": None if mfu is None else round(mfu, 4), "units_per_step": units / steps,
           "step_ms": round(1000 * seconds / steps, 2), "dtype": dtype,
           "compile": bool(resolved and resolved["compile"]),
           "cuda_graphs": bool(runner is not None and runner.trainer.graphed and runner.trainer.graphs > 0)}
    row["window_throughputs"] = [round(units / s, 2) for s in window_seconds]
    if resolved is not None:
        row["speed"] = resolved
        row["micro_batch"] = runner.micro_batch
        row["oom_retries"] = runner.oom_retries  # > 0: the micro-batch was halved, maybe between windows
        if resolved["compile"] and resolved["activation_memory_budget"] < 1:  # as loralab run records: did it hold?
            row["activation_memory_budget_partitions"] = partitions_since(partitions)
    if tuned is not None:
        row["micro_batch"] = tuned.pop("micro_batch")
        row["micro_batch_probe"] = tuned.pop("micro_batch_probe")
        row["speed"] = tuned
    return row


PROFILE_ROWS = 60


def _profile(run, data, title: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for item in data:
            run(item)
        torch.cuda.synchronize()
    # by self time, 60 rows: each kernel once (not again under every op that launched it), enough to set one
    # method's kernels beside another's (e.g. DoRA's beside LoRA's)
    # names 120 wide: inductor's fused kernels are told apart by their tails (torch's default cuts at 55)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=PROFILE_ROWS, max_name_column_width=120)
    device, dropped = device_intervals(prof.events())
    try:  # a note under the table: it never costs the table or the rows
        gaps = timeline_text(timeline(device), len(data)) + (f"\n  ({dropped} device event(s) ending before they "
                                                             "start left out)" if dropped else "")
    except ValueError as exc:
        gaps = f"GPU timeline: none ({exc})"
    return f"== profile: {title} ({len(data)} steps) ==\n{table}\n{gaps}"


def run_bench(preset: str, device: str, steps: int | None = None, warmup: int | None = None,
              only: str | None = None, speed: dict | None = None, profile: bool = False,
              log=print, on_row=None, methods: tuple[str, ...] | None = None,
              stacks: tuple[str, ...] | None = None, peer_memory: str = "budget", windows: int | None = None):
    """All rows of a preset; ``only`` keeps workloads whose name contains it, ``methods`` (names as in the
    preset, e.g. ``("fp8+lora",)``) the rows of those methods, ``stacks`` (of ``STACKS``) the rows of
    those stacks (the tuned peer is capped at loralab's budget or peak only when loralab's row runs too); ``speed``
    holds explicit loralab speed keys (e.g. ``{"compile": False}``), the rest are ``loralab run``'s defaults;
    ``peer_memory`` (``PEER_MEMORY``) what the tuned peer is held to (``tuned_cap``); ``windows`` (tiny 1, full 3):
    how many times each row times its steps, back to back, its throughput the median window's (an even count: the
    slower of the two middle ones), each window's in ``window_throughputs``: with 3 or more, a stall of the host within
    one window (the eager peers launch every kernel from it) shows there and does not move the row; a slowdown that lasts the
    whole row shows in every window. (A tuned-peer row once ran 11 to 12 % below the same peer run alone on the card,
    results/bench-fair-h100-1207; one window could not tell which of the two it was.)
    Raises BenchError (before any row runs) for a name in ``methods`` that the kept workloads lack, in
    ``stacks`` that is not a stack, a ``peer_memory`` not allowed, or ``windows`` below 1.

    Attention runs torch's kernel order, as ``loralab run`` and a careful user get it, except for the peers' rows
    of a workload whose lengths vary (``peer_attention``).
    """
    from tqdm import tqdm

    tuned_cap(None, peer_memory)  # refused before any row runs
    if windows is not None:
        check_windows(windows)
    kept = [w for w in presets(preset) if not only or only in w.name]
    known = sorted({m for w in kept for m in w.methods})
    unknown = [m for m in methods or () if m not in known]
    if unknown:
        raise BenchError(f"{', '.join(map(repr, unknown))} not in the preset {preset!r}"
                         + (f" (--only {only!r})" if only else "") + f"; its methods: {', '.join(known)}")
    wrong = [s for s in stacks or () if s not in STACKS]
    if wrong:
        raise BenchError(f"{', '.join(map(repr, wrong))} not a stack; allowed: {', '.join(STACKS)}")
    plan = [(w, m, s) for w in kept for m in w.methods if not methods or m in methods
            for s in STACKS if (not stacks or s in stacks) and (s != "liger" or liger_available(w, device))
            and (s == "loralab" or not m.startswith(FP8))]
    if not plan:
        raise BenchError(f"no row to run: stacks {', '.join(stacks or STACKS)} of methods {', '.join(methods or known)} "
                         f"on {device} (Liger needs CUDA and liger-kernel; the FP8-base methods run on loralab only)")
    rows, profiles = [], []
    for w, method, stack in tqdm(plan, desc="bench", disable=None):
        try:
            n_steps = steps or (3 if preset == "tiny" else w.steps or 8)
            n_warmup = warmup or (1 if preset == "tiny" else w.warmup or 3)
            n_windows = windows if windows is not None else 1 if preset == "tiny" else 3
            ours = next((r for r in rows if (r["workload"], r["method"], r["stack"]) == (w.name, method, "loralab")), None)
            budget, budget_from = tuned_cap(ours, peer_memory)  # the tuned peer's cap
            with peer_attention(w, stack, device) as cudnn_off:
                row = run_one(w, method, stack, device, n_steps, n_warmup, speed=speed, budget_gib=budget,
                              budget_from=budget_from, windows=n_windows)
            if cudnn_off:
                row["cudnn_sdpa"] = "off"  # peer_attention: this row ran without cuDNN's attention kernel
        except torch.OutOfMemoryError as exc:
            row = {"workload": w.name, "method": method, "stack": stack, "throughput": None, "unit": None,
                   "peak_memory_gib": None, "mfu": None, "error": f"out of memory: {str(exc)[:120]}"}
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            # one row's failure (a kernel missing on this device, say) is recorded with its cause and
            # the rest of the bench still runs: minutes of measured rows are not thrown away
            import traceback

            log(traceback.format_exc())
            row = {"workload": w.name, "method": method, "stack": stack, "throughput": None, "unit": None,
                   "peak_memory_gib": None, "mfu": None, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        rows.append(row)
        add_ratios(rows)
        log(format_row(row))
        if on_row is not None:
            on_row(rows)
    if profile and device == "cuda":
        # A second pass, after every row is timed: once the profiler has run in a process it
        # slows what follows (a peer row timed after a profiled row measured up to 30 % slower).
        for w, method, stack in [p for p in plan if p[2] == "loralab"]:
            run_one(w, method, stack, device, 2, warmup or w.warmup or 3, speed=speed, profile_to=profiles)
    return rows, profiles


@contextlib.contextmanager
def peer_attention(w: Workload, stack: str, device: str):
    """cuDNN's SDPA kernel switched off while a peer's row of a workload whose lengths vary runs on CUDA: cuDNN
    builds a plan for every new shape, which charges the peers' padded batches of changing width seconds a step
    (loralab's packed rows keep a few widths). Elsewhere torch's order stands: where torch puts cuDNN first
    (cuDNN above 9.15 on Hopper) a fixed-shape peer runs it as its user would, and loralab's rows run what
    ``loralab run`` does. Until 2026-12-07 cuDNN's kernel was off for every row (results/bench-cudnn-h100).
    Yields whether it is off for this row; only cuDNN's switch is touched, and it is restored after."""
    off = device == "cuda" and stack != "loralab" and w.lengths != "fixed"
    was = torch.backends.cuda.cudnn_sdp_enabled()
    if off:
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield off
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
