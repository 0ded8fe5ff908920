"""The auto micro-batch: how many samples (packed: rows of ``max_length`` tokens) one forward holds.

``probe_micro_batch`` measures, on the GPU, one forward+backward of the worst case (the longest
training sample repeated; packed: full rows) at micro-batch 1, 2, 4, ... up to the optimizer
batch: its peak memory and its tokens/s on the step's own shape (the prepared model: autocast,
compile, chunked loss; packed rows without a mask, as the step runs them). ``decide_micro_batch``
is the rule, a pure function of those measurements:

- stop when a size peaks above the budget (``speed.memory_fraction`` of the GPU) or runs out of
  memory: the size before it (1 at least: nothing is smaller). The probe runs before the first
  optimizer step, so the optimizer's state is not in its peak yet: the bytes it will take
  (``pending_state_bytes``) count against the budget beside each probed peak (an H100 FP8 LoRA
  row probed 19.78 GiB at micro-batch 4 against 19.79 and then ran at 20.45 GiB; AdamW's state
  for the 8B r32 adapters is 0.63 GiB, ``results/bench-probe-h100/``);
- stop when doubling gained less than ``MIN_GAIN`` tokens/s: the smaller size (as fast, less memory);
- stop at the optimizer batch (``limit``): a forward never holds more than one optimizer batch.

The budget is a share of the whole card, so it shrinks with the card: the default 0.25
(``speed_settings.Speed.memory_fraction``: 35.1 GiB on an H200, under the tuned peer's 37.7 GiB) is 20 GiB
on an 80 GB H100, where the 8B LoRA shape (26.9 GiB at 4 x 512) gets a smaller micro-batch than the
fixed 2,048-token target gave it; set ``speed.memory_fraction`` to 0.35 or more there.
With ``speed.loss_chunk_size`` "auto" (a causal LM's fused loss), a size over the budget is probed
once more with ``SMALL_LOSS_CHUNK``-token chunks of the loss (``decide_loss_chunk``): the loss's
logits chunk is the one transient on the step's peak that shrinks without changing a number.
An explicit ``speed.micro_batch`` is never changed. Where ``speed.fp8_transpose_cache`` is "auto" on an FP8
base, that size alone is measured once (``run/micro_batch.measure_micro_batch``) for what it leaves of
the budget. The choice, the reason and every measurement go into the record
(``train_info.speed.micro_batch_probe``, ``probe_record``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from loralab.data import collate
from loralab.speed.attention import cudnn_masked_width_risk, step_width
from loralab.speed.graphs import bucket_width
from loralab.speed.losses import IGNORE_INDEX
from loralab.speed.shared_input import clear_input_groups
from loralab.speed.step import causal_lm_loss, seq_cls_loss
from loralab.speed_settings import LOSS_CHUNK

MIN_GAIN = 0.05
"""Auto micro-batch: a doubling that gains less than 5 % tokens/s is not worth its memory (timing
one or two forwards on a busy GPU varies by 1-2 %). On the 8B LoRA shape 4 x 512 ran 15,837
tokens/s at 26.9 GiB and 8 x 512 14,567 at 41.2 GiB on an H200 (results/bench/README.md)."""
TIMED_REPEATS = 2
"""Forward+backward passes timed per probed size, after one untimed pass (compile, allocator growth);
the fastest counts (``time_passes``)."""
RETIME_DROP = 0.2
"""A doubled size whose tokens/s fall more than 20 % below the size before it is timed once more and
the faster measurement kept (``Trial.retimed``). 20 % is a judgement, not a measurement: the largest
real drop we have seen from a doubling is 8 % (8 x 512 against 4 x 512 on an H200, ``MIN_GAIN``),
and timing noise is 1-2 %, so a fall of a fifth means something else ran. On an H100 (results/bench-fair-h100-1206/,
call 4) the 8B LoRA row probed micro-batch 4 at 5,206 tokens/s against 9,294 at 2, where the same
code on another H100 probed 14,855 at 4: the probe kept 2, and the run gave up 7 % of its speed."""


SMALL_LOSS_CHUNK = 128
"""What "auto" shrinks the loss chunk to when a micro-batch does not fit. On an H100 (Llama-3-8B
shape, r32 LoRA, ``results/bench-probe-h100/losschunk-*``) 128-token chunks probed 0.40 GiB lower at
micro-batch 1 and 1.50 GiB lower at 4 x 512 tokens (FP8 base) than 1,024, and ran 0.959x (bf16,
micro-batch 1) and 0.937x (FP8 base, micro-batch 4) as fast: each chunk reads the head's weight again."""


@dataclass
class Trial:
    """One probed micro-batch: ``size`` samples (packed: rows), ``peak`` bytes (``inf``: out of
    memory; None: not measured, CPU) and ``rate`` tokens/s of a forward+backward (None: not timed)."""

    size: int
    peak: float | None
    rate: float | None
    retimed: tuple[Trial, Trial] | None = None
    """A size measured twice (its first rate ``RETIME_DROP`` below the size before it): both
    measurements as taken; ``rate`` and ``peak`` are then the faster rate and the higher peak, or
    out of memory (``inf``, None) if either ran out. None: measured once."""


@dataclass
class Decision:
    """``micro_batch`` chosen (None: not yet), else ``next_size`` to probe; ``reason`` in words."""

    micro_batch: int | None
    next_size: int | None
    reason: str


def pending_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes ``optimizer``'s state will add at its first step: for every parameter whose state is
    not allocated yet (for torch's optimizers 0 once a step has run: the state is then in the memory
    the probe measures; peft's ``LoraFAOptimizer`` keys its state by name, so it always counts as
    to come: the probe runs before the first step, where that is right).

    torch's Adam and AdamW keep ``exp_avg`` and ``exp_avg_sq`` (with ``amsgrad`` also
    ``max_exp_avg_sq``) shaped and typed like the parameter, and a float32 ``step`` that lives on
    the parameter's device when ``fused`` or ``capturable`` (torch/optim/adam.py, ``_init_group``);
    SGD one ``momentum_buffer`` when ``momentum`` is set. Any other optimizer is counted as Adam
    (two parameter-sized states, the common case); the allocator's rounding is not counted."""
    total = 0
    for group in optimizer.param_groups:
        if isinstance(optimizer, torch.optim.SGD):
            copies, step = (1 if group.get("momentum", 0) else 0), 0
        else:
            copies = 3 if group.get("amsgrad", False) else 2
            step = 4 if group.get("fused") or group.get("capturable") else 0
        for p in group["params"]:
            if p.requires_grad and not optimizer.state.get(p):
                total += copies * p.numel() * p.element_size() + step
    return total


def _over_budget(t: Trial, budget: float | None, held: float) -> bool:
    """Whether ``t``'s peak with ``held`` bytes beside it passes ``budget`` (out of memory does; a peak
    not measured, or no budget, does not)."""
    return budget is not None and t.peak is not None and t.peak + held > budget


def _fits_budget(t: Trial, budget: float, held: float) -> bool:
    """Whether ``t``'s peak was measured and, with ``held`` beside it, stays within ``budget``."""
    return t.peak is not None and not _over_budget(t, budget, held)


def decide_micro_batch(trials: list[Trial], *, limit: int, budget: float | None, min_gain: float = MIN_GAIN,
                       explicit: int | None = None, held: float = 0.0) -> Decision:
    """The auto micro-batch rule over the sizes measured so far (``trials``, in probing order:
    1, 2, 4, ... capped at ``limit``). ``budget``: bytes a forward may peak at (None: no cap);
    ``held``: bytes the run will hold beyond a probed peak (the optimizer state not yet allocated,
    ``pending_state_bytes``), counted against the budget beside every peak;
    ``min_gain``: the least tokens/s gain that makes a doubling pay (0: any gain); ``explicit``:
    a micro-batch set by the experiment, taken as it is. Returns the choice and why, or the next
    size to probe. A rate of None (not timed) counts as paying."""
    if explicit is not None:
        return Decision(explicit, None, "explicit: speed.micro_batch")
    if not trials:
        return Decision(None, 1, "")
    last, before = trials[-1], trials[-2] if len(trials) > 1 else None
    if last.peak == float("inf") and budget is None:  # no budget: an out-of-memory error still stops the search
        if before is None:
            return Decision(1, None, "memory: micro-batch 1 out of memory; 1 is the least")
        return Decision(before.size, None, f"memory: micro-batch {last.size} out of memory")
    if _over_budget(last, budget, held):
        # as many decimals as tell the two apart (19.84 over 19.79 GiB read "19.8 over 19.8" at one)
        need = last.peak + held
        digits = next((d for d in (1, 2, 3) if f"{need / 2**30:.{d}f}" != f"{budget / 2**30:.{d}f}"), 4)
        if held and last.peak != float("inf"):  # the state is shown in hundredths: so are peak and budget
            digits = max(digits, 2)
        what = "out of memory" if last.peak == float("inf") else f"peaked at {last.peak / 2**30:.{digits}f} GiB"
        if held and last.peak != float("inf"):
            what += f" + {held / 2**30:.2f} GiB of optimizer state"
        over = f"over the {budget / 2**30:.{digits}f} GiB budget"
        if before is None:
            return Decision(1, None, f"memory: micro-batch 1 {what}, {over}; 1 is the least")
        return Decision(before.size, None, f"memory: micro-batch {last.size} {what}, {over}")
    if before is not None and None not in (before.rate, last.rate) and last.rate < before.rate * (1 + min_gain):
        gain = last.rate / before.rate - 1
        least = f"less than {100 * min_gain:.0f} %" if min_gain > 0 else "not faster"
        return Decision(before.size, None, f"flat: micro-batch {last.size} gained {100 * gain:+.1f} % tokens/s over "
                                           f"{before.size}, {least}")
    if last.size >= limit:
        return Decision(last.size, None, f"limit: the optimizer batch ({limit})")
    return Decision(None, min(2 * last.size, limit), "")


def decide_loss_chunk(decision: Decision, trials: list[Trial], small: Trial, *, budget: float, held: float = 0.0,
                      min_gain: float = MIN_GAIN) -> tuple[bool, Decision]:
    """Whether the size that went over the budget runs with ``SMALL_LOSS_CHUNK``-token loss chunks.

    ``decision``: ``decide_micro_batch``'s memory stop after ``trials`` (the last one over
    ``budget``); ``small``: that size probed again with the small chunks. It is taken when it fits
    (peak + ``held`` within the budget) and either nothing smaller exists (micro-batch 1: the run
    would go over the budget otherwise) or it beats the size before it by ``min_gain`` tokens/s
    (the small chunks cost 4-6 %, a doubled micro-batch can gain more). At micro-batch 1 over the
    budget either way, the small chunks are taken when they peak lower (the least memory the run
    can take). Returns (small chunks taken, the decision with its reason)."""
    before = trials[-2] if len(trials) > 1 else None
    fits = _fits_budget(small, budget, held)
    peak = ("out of memory" if small.peak == float("inf") else "not measured" if small.peak is None
            else f"peaked at {small.peak / 2**30:.2f} GiB" + (f" + {held / 2**30:.2f} GiB of optimizer state" if held else ""))
    what = f"micro-batch {small.size} with {SMALL_LOSS_CHUNK}-token loss chunks {peak}"
    if not fits:
        lower = before is None and small.peak is not None and small.peak < trials[-1].peak
        if lower:  # micro-batch 1 goes over either way: the run takes the least memory it can
            return True, Decision(small.size, None, f"{decision.reason}; {what}, over it too but lower: the smaller "
                                                    "chunks are kept, the run going over the budget either way")
        return False, Decision(decision.micro_batch, None, f"{decision.reason}; {what}, over it too")
    if before is None:
        return True, Decision(small.size, None, f"memory: {decision.reason.removeprefix('memory: ')}; {what}, within "
                                                "it: the loss's chunks shrink rather than the run going over")
    if None not in (small.rate, before.rate) and small.rate < before.rate * (1 + min_gain):
        gain = small.rate / before.rate - 1
        return False, Decision(decision.micro_batch, None, f"{decision.reason}; {what} but gained {100 * gain:+.1f} % "
                                                           f"tokens/s over {before.size}, less than {100 * min_gain:.0f} %")
    return True, Decision(small.size, None, f"memory: {what}, within the {budget / 2**30:.2f} GiB budget"
                                            + ("" if None in (small.rate, before.rate) else
                                               f", {100 * (small.rate / before.rate - 1):+.1f} % tokens/s over {before.size}"))


def _peak_gib(t: Trial) -> float | str | None:
    """A trial's peak as the record keeps it: GiB to 2 places, ``"oom"``, or None (not measured)."""
    return "oom" if t.peak == float("inf") else None if t.peak is None else round(t.peak / 2**30, 2)


def _rate(t: Trial) -> float | None:
    """A trial's tokens/s as the record keeps it: to 1 place, or None (not timed)."""
    return None if t.rate is None else round(t.rate, 1)


def _retimed_record(t: Trial) -> dict:
    """Both measurements of a size measured twice (``Trial.retimed``), as taken: tokens/s and peaks."""
    return {"tokens_per_second": [_rate(m) for m in t.retimed], "peaks_gib": [_peak_gib(m) for m in t.retimed]}


def probe_record(trials: list[Trial], decision: Decision, *, budget: float | None, memory_fraction: float | None,
                 row_tokens: int | None, min_gain: float | None = MIN_GAIN, held: float = 0.0) -> dict:
    """What the record keeps of a micro-batch decision: the choice, the reason, each probed size
    with its peak (GiB, as measured; None: not measured, or out of memory as ``"oom"``) and
    tokens/s, the budget (GiB), the fraction it came from, the gain threshold, the tokens of one
    probed row, ``optimizer_state_gib`` (``held``: counted against the budget beside each peak;
    None without a budget) and ``retimed``: each size measured twice (``RETIME_DROP``), with both
    measurements' tokens/s and peaks as taken (``tokens_per_second`` and ``peaks_gib`` hold what was
    kept)."""
    return {"micro_batch": decision.micro_batch, "reason": decision.reason, "sizes": [t.size for t in trials],
            "peaks_gib": [_peak_gib(t) for t in trials],
            "tokens_per_second": [_rate(t) for t in trials],
            "budget_gib": None if budget is None else round(budget / 2**30, 2), "memory_fraction": memory_fraction,
            "min_gain": min_gain, "row_tokens": row_tokens, "optimizer_state_gib": None if budget is None else round(held / 2**30, 2),
            "retimed": [{"size": t.size, **_retimed_record(t)} for t in trials if t.retimed is not None]}


def worst_case_batch(longest: dict, m: int, *, packing: bool, width: int, pad_id: int) -> dict:
    """``m`` copies of the longest sample as the step would feed them: packed, rows of ``width``
    tokens (the sample's ids repeated to fill a row) without mask or positions; else padded to
    ``width`` with an attention mask. Per-token weights sum to 1 over the batch."""
    if not packing:
        batch = collate([longest] * m, pad_id, width)
        tokens = batch["labels"].dim() == 2
        w = torch.full((m,), 1.0 / (m * len(longest["input_ids"]) if tokens else m))
        batch["loss_weights"] = batch["attention_mask"] * w[:, None] if tokens else w
        return batch
    ids = torch.tensor(longest["input_ids"]).repeat(width // len(longest["input_ids"]) + 1)[:width]
    ids = ids.repeat(m, 1)
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "loss_weights": torch.full((m, width), 1.0 / (m * width))}


def _implausibly_slow(before: Trial, last: Trial) -> bool:
    """Whether ``last`` (a doubled size) ran more than ``RETIME_DROP`` below ``before``'s tokens/s."""
    return None not in (before.rate, last.rate) and last.rate < before.rate * (1 - RETIME_DROP)


def _faster(first: Trial, again: Trial) -> Trial:
    """One size measured twice: the faster rate and the higher peak (the cautious one: memory does not
    stall), or out of memory (peak ``inf``, rate None) where either measurement ran out; both kept
    in ``retimed``."""
    if float("inf") in (first.peak, again.peak):
        return Trial(first.size, float("inf"), None, retimed=(first, again))
    peaks = [p for p in (first.peak, again.peak) if p is not None]
    rates = [r for r in (first.rate, again.rate) if r is not None]
    return Trial(first.size, max(peaks) if peaks else None, max(rates) if rates else None, retimed=(first, again))


def time_passes(run_pass: Callable[[], None], sync: Callable[[], None], repeats: int = TIMED_REPEATS) -> float:
    """Seconds of the fastest of ``repeats`` timed calls of ``run_pass`` (each synchronised by
    ``sync``), after one untimed call (compile, allocator growth, autotuning). The fastest, as
    ``timeit`` advises: a stall (another process, a late recompile) only ever adds time. An error
    of ``run_pass`` (``torch.OutOfMemoryError`` among them) reaches the caller."""
    run_pass()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run_pass()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_trial(size: int, units: int, run_pass: Callable[[], None], device: torch.device | str) -> Trial:
    """One probed size: ``run_pass`` (a forward+backward) timed by ``time_passes``, ``units`` (real
    tokens, or samples) per pass over the fastest pass's seconds, and on a CUDA ``device`` the peak
    memory since the measurement began (None elsewhere); out of memory gives peak ``inf`` and no
    rate. Shared by loralab's probe and the bench's tuned peer (``bench.peers.search_micro_batch``),
    so both are measured alike. The caller drops gradients and frees the batch."""
    cuda = torch.device(device).type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = time_passes(run_pass, sync)
        return Trial(size, torch.cuda.max_memory_allocated(device) if cuda else None, units / seconds)
    except torch.OutOfMemoryError:
        return Trial(size, float("inf"), None)


def probe_sizes(measure: Callable[[int], Trial], *, limit: int, budget: float | None, held: float = 0.0,
                min_gain: float = MIN_GAIN, loss_chunk: Callable[[int], None] | None = None):
    """The probe's search over sizes, given ``measure(m)`` (one size's ``Trial`` as the model runs
    now): 1, 2, 4, ... until ``decide_micro_batch`` settles, a size within the budget with more than
    ``RETIME_DROP`` fewer tokens/s than the one before it measured once more (``Trial.retimed``);
    with ``loss_chunk`` (the fused loss's chunk setter, ``speed.loss_chunk_size`` "auto") set to
    ``LOSS_CHUNK`` first, a size over the budget is measured again at ``SMALL_LOSS_CHUNK`` (and once
    more if it fits but falls ``RETIME_DROP`` below the size before it) and ``decide_loss_chunk``
    keeps one chunk, which is left set. Returns (decision, trials, chunk or None when fixed, the
    small-chunk trial or None)."""
    trials: list[Trial] = []
    chunk, small = None, None
    if loss_chunk is not None:
        chunk = LOSS_CHUNK
        loss_chunk(chunk)
    decision = decide_micro_batch(trials, limit=limit, budget=budget, min_gain=min_gain, held=held)
    while decision.micro_batch is None:
        trials.append(measure(decision.next_size))
        if not _over_budget(trials[-1], budget, held) and len(trials) > 1 and _implausibly_slow(trials[-2], trials[-1]):
            trials[-1] = _faster(trials[-1], measure(trials[-1].size))
        over = _over_budget(trials[-1], budget, held)
        decision = decide_micro_batch(trials, limit=limit, budget=budget, min_gain=min_gain, held=held)
        if decision.micro_batch is not None and over and loss_chunk is not None:
            loss_chunk(SMALL_LOSS_CHUNK)
            small = measure(trials[-1].size)
            if _fits_budget(small, budget, held) and len(trials) > 1 and _implausibly_slow(trials[-2], small):  # a stall
                small = _faster(small, measure(small.size))
            taken, decision = decide_loss_chunk(decision, trials, small, budget=budget, held=held, min_gain=min_gain)
            chunk = SMALL_LOSS_CHUNK if taken else LOSS_CHUNK
            loss_chunk(chunk)
    return decision, trials, chunk, small


def worst_case_measurer(model, features: list[dict], *, kind: str, packing: bool, max_length: int, pad_id: int,
                        device: torch.device) -> tuple[Callable[[int], Trial], int]:
    """``measure(m)``: one ``Trial`` of the worst case of ``features`` at micro-batch ``m`` as the model runs now
    (gradients dropped, the batch freed), and the row width it runs. Raises ValueError off CUDA."""
    if device.type != "cuda":
        raise ValueError("the micro-batch probe needs a CUDA device")
    longest = max(features, key=lambda f: len(f["input_ids"]))
    width = max_length if packing else len(longest["input_ids"])
    if cudnn_masked_width_risk(device):  # as wide as a graphed step pads it (speed/attention.py), bucketed first
        width = step_width(width if packing else bucket_width(width), True)
    loss = causal_lm_loss if kind == "causal_lm" else seq_cls_loss
    params = [p for p in model.parameters() if p.requires_grad]

    def measure(m: int) -> Trial:
        batch = {k: v.to(device) for k, v in worst_case_batch(longest, m, packing=packing, width=width,
                                                                pad_id=pad_id).items()}
        trial = measure_trial(m, m * width, lambda: loss(model, batch)[0].backward(), device)
        for p in params:
            p.grad = None
        clear_input_groups(model)  # an out-of-memory pass that raised mid-group keeps its input's graph otherwise
        batch = None  # noqa: F841 (the closure above held it)
        torch.cuda.empty_cache()
        return trial

    return measure, width


def budget_and_state(device: torch.device, memory_fraction: float, optimizer) -> tuple[float, int]:
    """(bytes a forward may peak at: ``memory_fraction`` of the CUDA ``device``'s memory, bytes ``optimizer``'s state
    will add at its first step: ``pending_state_bytes``, 0 without one)."""
    held = 0 if optimizer is None else pending_state_bytes(optimizer)
    return memory_fraction * torch.cuda.get_device_properties(device).total_memory, held


def probe_micro_batch(model, features: list[dict], *, kind: str, packing: bool, max_length: int, limit: int,
                      pad_id: int, device: torch.device, memory_fraction: float, min_gain: float = MIN_GAIN,
                      optimizer: torch.optim.Optimizer | None = None, loss_chunk: Callable[[int], None] | None = None,
                      log: Callable[[str], None] = print) -> tuple[int, dict]:
    """The auto micro-batch on a CUDA ``device`` (module docstring): probes 1, 2, 4, ... up to
    ``limit`` with the worst case of ``features`` until ``decide_micro_batch`` settles, counting
    ``optimizer``'s state not yet allocated (``pending_state_bytes``) against the budget.
    ``loss_chunk``: sets the fused loss's chunk (tokens; ``speed.loss_chunk_size`` "auto", starting
    at ``LOSS_CHUNK``): a size over the budget is probed again at ``SMALL_LOSS_CHUNK``
    (``decide_loss_chunk``), and the chunk is left as chosen. None: the chunk is fixed. Weights
    are not changed (gradients dropped, RNG restored). Returns (micro-batch, ``probe_record``, with
    ``loss_chunk_size`` the chunk chosen, None when fixed).
    Raises ValueError off CUDA (nothing to measure there)."""
    measure, width = worst_case_measurer(model, features, kind=kind, packing=packing, max_length=max_length,
                                         pad_id=pad_id, device=device)
    budget, held = budget_and_state(device, memory_fraction, optimizer)
    with torch.random.fork_rng(devices=[device]):
        decision, trials, chunk, small = probe_sizes(measure, limit=limit, budget=budget, held=held, min_gain=min_gain,
                                                     loss_chunk=loss_chunk)
    record = probe_record(trials, decision, budget=budget, memory_fraction=memory_fraction, row_tokens=width,
                          min_gain=min_gain, held=held)
    record["loss_chunk_size"] = chunk
    if small is not None:  # the size over the budget, probed again with small loss chunks
        record["small_loss_chunk_trial"] = {"size": small.size, "peak_gib": _peak_gib(small),
                                            "tokens_per_second": _rate(small)}
        if small.retimed is not None:  # measured twice: both as taken
            record["small_loss_chunk_trial"]["retimed"] = _retimed_record(small)
    log(f"micro-batch {decision.micro_batch} ({'rows of ' + str(width) + ' tokens' if packing else 'samples'}; "
        f"probed {record['sizes']}, {decision.reason})")
    return decision.micro_batch, record
