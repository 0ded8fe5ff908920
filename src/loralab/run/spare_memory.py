"""What the probed micro-batch leaves of the memory budget, spent (issue 22: "the auto micro-batch spends the memory
the run is allowed"): first ``speed.fp8_transpose_cache`` "auto" on the FP8 layers' column-major codes, then
``speed.activation_memory_budget`` "auto" on the activations torch's default partition saves (``spend_spare_on_activations``:
1.0 in place of ``speed_settings.ACTIVATION_BUDGET`` where the estimate of what it adds fits what is left).

An FP8 layer's input gradient reads its codes with the reduced axis contiguous, so every backward copies them
transposed (``speed/fp8.py``: 1 byte per weight read and written), unless the copy is kept once
(``Fp8Linear.cache_transpose``, 1 byte per weight held). The micro-batch probe (``run/probe.py``) stops at the
optimizer batch, a size that no longer pays, or the budget; whatever the chosen size leaves below the budget
would otherwise stay unused. "auto" keeps the copies of the largest layers that fit in it, after a headroom.
Measured on one H100 at the Llama-3-8B shape, micro-batch 4 (results/bench-transposecache-h100/): every layer's
codes kept (+6.5 GiB) ran FP8-base LoRA at 18,261 and 18,293 tokens/s against 17,320 and 17,326 copying them
(1.055x), the MLP's alone (0.81, +5.25 GiB) 18,050, FP8-base DoRA 16,427 against 15,691 (1.047x); with
``memory_fraction`` 0.441 "auto" kept every layer's (17.28 GiB spare) and the run peaked at 24.2 GiB, 0.08 GiB over
the probe's peak + the optimizer state + the cached bytes. At the default 0.25 of an 80 GB card the 8B FP8 LoRA
probe left 2.15 GiB and "auto" kept the q and o codes (64 layers, 1.00 GiB; results/bench-fair-h100-1206/defaults).

The arithmetic, per run (``spare_bytes``, ``cache_spare_transposes``):

    spare = budget − probed peak of the micro-batch the step runs (at the loss chunk it runs) − optimizer state
    cached bytes ≤ spare − HEADROOM · budget        (the least spare over ranks, so every rank caches alike)

The probed peak already holds one layer's per-backward copy, which caching removes, so the run's peak grows by
at most the cached bytes. An explicit ``speed.micro_batch`` on CUDA is measured once for its peak
(``run/micro_batch.py``). Where nothing is measured (CPU, FSDP) "auto" is 0 (``speed_settings.Speed.resolve``,
``run.step.distributed_speed``). The cache gives the same bits as the copies
(``tests/test_fp8.py``).
"""

from __future__ import annotations

from typing import Callable

from loralab import distributed
from loralab.run.probe import SMALL_LOSS_CHUNK
from loralab.speed.fp8 import cache_transposes, fp8_layers
from loralab.speed.step import compile_layers

HEADROOM = 0.05
"""Share of the budget "auto" leaves unspent: what the probe's peak does not see (the allocator's rounding and
fragmentation, the first optimizer step's temporaries, CUDA graph pools) and the record's rounding of peaks to
0.01 GiB. On an H100 the probe's peak plus AdamW's state came within 0.04 GiB of a run's peak
(results/bench-probe-h100/)."""


def headroom_bytes(budget_gib: float | None) -> int:
    """``HEADROOM`` of a budget of ``budget_gib`` GiB, in bytes (0 without a budget)."""
    return int(HEADROOM * (budget_gib or 0.0) * 2**30)


def spare_bytes(probe: dict, micro_batch: int, loss_chunk: int | str | None) -> int | None:
    """Bytes the budget leaves beside ``micro_batch`` in a probe record (``run.probe.probe_record`` with
    ``loss_chunk_size`` and ``small_loss_chunk_trial``): ``budget_gib`` − that size's probed peak − the
    optimizer state counted (``optimizer_state_gib``). The peak is the small-loss-chunk trial's where the run
    takes ``SMALL_LOSS_CHUNK`` (``loss_chunk``) at that size, else the last trial of that size. Negative where
    the run goes over the budget anyway (micro-batch 1); None where no budget or no such measured size
    (out of memory, not probed)."""
    small = probe.get("small_loss_chunk_trial")
    if loss_chunk == SMALL_LOSS_CHUNK and small and small.get("size") == micro_batch:
        peak = small.get("peak_gib")
    else:
        peaks = [p for size, p in zip(probe.get("sizes", []), probe.get("peaks_gib", [])) if size == micro_batch]
        peak = peaks[-1] if peaks else None
    budget = probe.get("budget_gib")
    if budget is None or not isinstance(peak, (int, float)):
        return None
    return int((budget - peak - (probe.get("optimizer_state_gib") or 0.0)) * 2**30)


def cache_spare_transposes(model, speed, spare: int | None, budget_gib: float | None,
                           log: Callable[[str], None] = print) -> float:
    """Settle ``speed.fp8_transpose_cache`` "auto" on ``model``: cache the column-major codes of its largest FP8
    layers (``speed/fp8.cache_transposes(..., fill=True)``: a group of equal-sized layers whole or not at all,
    one that does not fit skipped for smaller ones) within ``spare`` bytes (``spare_bytes``, the least over
    ranks) less ``HEADROOM`` of the ``budget_gib`` (GiB). Sets ``speed.fp8_transposes_cached`` ({layers, bytes,
    total_bytes} as ``cache_transposes`` counts them, and ``auto_spare_gib``, ``auto_headroom_gib``) and logs
    it. Returns the share of the FP8 weight bytes cached (0.0 where the model has no FP8 layer or nothing fits),
    which an explicit ``fp8_transpose_cache`` of that value would not always repeat (it stops at the first
    group that does not fit)."""
    total = sum(m.weight.numel() for m in fp8_layers(model))
    if not total:
        return 0.0
    headroom = headroom_bytes(budget_gib)
    room = 0 if spare is None else max(0, spare - headroom)
    cached = cache_transposes(model, min(1.0, room / total), fill=True)
    speed.fp8_transposes_cached = {**cached, "auto_spare_gib": None if spare is None else round(spare / 2**30, 2),
                                   "auto_headroom_gib": round(headroom / 2**30, 2)}
    log_transposes(speed, log)
    return round(cached["bytes"] / total, 4)


def log_transposes(speed, log: Callable[[str], None] = print) -> None:
    """One log line of what ``speed.fp8_transposes_cached`` holds (nothing where no FP8 layer was cached or asked)."""
    cached = speed.fp8_transposes_cached
    if cached is None:
        return
    what = (f"the column-major codes of {cached['layers']} FP8 layer(s) cached, {cached['bytes'] / 2**30:.2f} of "
            f"{cached['total_bytes'] / 2**30:.2f} GiB")
    if "auto_spare_gib" not in cached:  # an explicit share
        nothing = "; NOTHING cached: the largest layers alone are a larger share (speed/fp8.py cache_transposes)"
        log(f"speed.fp8_transpose_cache {speed.fp8_transpose_cache}: {what}{nothing if not cached['layers'] else ''}")
        return
    spare = cached["auto_spare_gib"]
    room = ("no measured spare memory" if spare is None else f"the micro-batch leaves nothing in the budget ({spare:.2f} "
            "GiB)" if spare <= 0 else f"{spare:.2f} GiB left in the budget by the micro-batch, "
            f"{cached['auto_headroom_gib']:.2f} GiB of it kept free")
    nothing = "; nothing cached: not even the smallest layers' codes fit" if not cached["layers"] else ""
    log(f"speed.fp8_transpose_cache auto ({room}): {what}{nothing}")


FULL_PARTITION_EXTRA = 0.43
"""What torch's default partition (``activation_memory_budget`` 1.0) saves beyond ``speed_settings.ACTIVATION_BUDGET``'s (0.8),
as a share of the bytes one more probed row adds to the peak at 0.8. On CPU a compiled Llama layer with LoRA saves ~20
hidden sizes per token at 1.0 and ~14 at 0.8 (tests/test_speed_memory_budget.py): 6/14 = 0.43. On an H100 at the 8B
shape a row added 1.83 GiB (bf16 LoRA's probe, micro-batch 2 to 4; results/bench-fair-h100-1206/probecheck) and 1.0
peaked 2.89 GiB over 0.8 at micro-batch 4, 0.39 of four rows' 7.32 GiB (results/bench-speedab-h100), so the estimate
errs high there by ~0.25 GiB; the same call ran 1.011x (bf16 LoRA) and 1.017x (FP8-base LoRA) the tokens/s at 1.0."""


def row_bytes(probe: dict, micro_batch: int) -> int | None:
    """Bytes one more row adds to the probed peak at ``micro_batch``: the slope between the two largest sizes up to it
    with a measured peak (out of memory and unmeasured sizes skipped). None with fewer than two such sizes."""
    peaks = {size: p for size, p in zip(probe.get("sizes", []), probe.get("peaks_gib", []))
             if size <= micro_batch and isinstance(p, (int, float))}
    if len(peaks) < 2:
        return None
    (s1, p1), (s2, p2) = sorted(peaks.items())[-2:]
    return int((p2 - p1) / (s2 - s1) * 2**30)


def spend_spare_on_activations(model, speed, probe: dict, micro_batch: int, spare: int | None,
                               log: Callable[[str], None] = print) -> bool:
    """Settle ``speed.activation_memory_budget`` "auto" (resolved to ``speed_settings.ACTIVATION_BUDGET`` for the probe) after
    the micro-batch probe and the transpose cache: where the layers compile and ``FULL_PARTITION_EXTRA`` · ``row_bytes``
    · ``micro_batch`` fits in ``spare`` (``spare_bytes``, the least over ranks) less the codes "auto" cached less
    ``HEADROOM`` of the budget, on every rank, the layers compile again at 1.0 (``speed/step.compile_layers``; the
    probe's compiled code is already dropped where it probed more than one size, and with one size there is no
    slope, so nothing switches). Sets ``speed.activation_memory_budget`` and ``probe["activation_memory_budget"]``
    ({budget, extra_gib: the estimate, room_gib: what was left for it}); logs it. Returns whether it switched."""
    per_row = row_bytes(probe, micro_batch) if speed.compile and speed.activation_memory_budget < 1 else None
    cached = speed.fp8_transposes_cached or {}
    room = None if spare is None or per_row is None else (
        spare - (cached.get("bytes", 0) if "auto_spare_gib" in cached else 0) - headroom_bytes(probe.get("budget_gib")))
    extra = None if per_row is None else int(FULL_PARTITION_EXTRA * max(per_row, 0) * micro_batch)
    switch = bool(distributed.min_over_ranks(int(room is not None and room >= extra)))  # every rank calls it
    if room is None:
        return False
    probe["activation_memory_budget"] = {"budget": 1.0 if switch else speed.activation_memory_budget,
                                         "extra_gib": round(extra / 2**30, 2), "room_gib": round(room / 2**30, 2)}
    holds = "holds" if switch else "does not hold" if room < extra else "holds, another rank's does not hold"
    log(f"speed.activation_memory_budget auto: {1.0 if switch else speed.activation_memory_budget} (torch's default "
        f"partition saves an estimated {extra / 2**30:.2f} GiB more at micro-batch {micro_batch}; "
        f"{room / 2**30:.2f} GiB left in the budget {holds} it)")
    if switch:
        speed.activation_memory_budget = 1.0
        compile_layers(model, speed)
    return switch
