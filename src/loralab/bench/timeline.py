"""Where a profiled step leaves the GPU idle: the union of its device intervals against their span.

A saving measured on a kernel alone reaches the step only where the GPU is busy end to end: if the step waits on the
host between graph replays, a faster kernel may only lengthen a gap (results/bench-fair-h100-1207e: the DoRA refresh
0.28 ms faster alone, graphed, and the step's median window 0.01 ms slower). ``loralab bench --profile`` (``runner._profile``)
prints this summary under each row's kernel table, from the profiler's device events (kernels, copies, sets) on
every stream, overlapping ones merged.
"""

from __future__ import annotations

import torch

GAPS_SHOWN = 5


def device_intervals(events) -> tuple[list[tuple[float, float, str]], int]:
    """(start, end, name) in microseconds of the CUDA events among torch.profiler's ``events`` (``prof.events()``:
    kernels, copies and sets on every stream), leaving out annotated ranges (``gpu_user_annotation``: they span idle
    time too; torch's own device total leaves them out the same way), and how many events were dropped for ending
    before they start."""
    kept, dropped = [], 0
    for e in events:
        if (e.device_type != torch.autograd.DeviceType.CUDA or e.is_user_annotation
                or getattr(e, "activity_type", None) == "gpu_user_annotation"):
            continue
        if e.time_range.end < e.time_range.start:
            dropped += 1
            continue
        kept.append((e.time_range.start, e.time_range.end, e.name))
    return kept, dropped


def timeline(events: list[tuple[float, float, str]], gaps_shown: int = GAPS_SHOWN) -> dict:
    """Busy and idle time of a device over ``events``: (start, end, name) in microseconds, any order, on any streams.

    Zero-length events (start == end) are left out: they add no busy time and would split a gap. Events that touch
    (one starts where another ends) leave no gap between them.
    Returns ``span_us`` (first start to last end), ``busy_us`` (the union of the intervals: overlap counted once),
    ``idle_us`` (span - busy), ``busy_share`` and ``gaps``: the ``gaps_shown`` longest idle stretches, longest first,
    each ``{"us", "after", "before"}`` with the names of the event that ended last before it and the one that starts
    it. Raises ValueError for no events or an event that ends before it starts."""
    bad = [e for e in events if e[1] < e[0]]
    if bad:
        raise ValueError(f"timeline: {len(bad)} event(s) end before they start, e.g. {bad[0]}")
    ordered = sorted(e for e in events if e[1] > e[0])
    if not ordered:
        raise ValueError("timeline: no device events of nonzero length (was the profile taken on a GPU?)")
    busy, gaps = 0.0, []
    start, end, last = ordered[0][0], ordered[0][1], ordered[0][2]
    for s, e, name in ordered[1:]:
        if s > end:
            busy += end - start
            gaps.append({"us": s - end, "after": last, "before": name})
            start, end, last = s, e, name
        elif e > end:
            end, last = e, name
    busy += end - start
    span = max(e for _, e, _ in ordered) - ordered[0][0]
    gaps.sort(key=lambda g: -g["us"])
    return {"span_us": span, "busy_us": busy, "idle_us": span - busy, "busy_share": busy / span if span else 1.0,
            "gaps": gaps[:gaps_shown]}


def timeline_text(summary: dict, steps: int) -> str:
    """``timeline``'s summary as lines under a profile table, per step where ``steps`` > 0. The span runs from the
    first to the last device event of the profiled steps (the host's time before the first kernel is not in it, a
    gap between two steps is), under the profiler, which slows the host: read the idle time as an upper bound of
    the unprofiled step's, and the row's own ms a step as the step."""
    per = max(steps, 1)
    lines = [f"GPU timeline over {steps} profiled step(s), first to last device event: span "
             f"{summary['span_us'] / 1000 / per:.2f} ms a step, busy {summary['busy_us'] / 1000 / per:.2f} ms "
             f"({summary['busy_share']:.1%}), idle {summary['idle_us'] / 1000 / per:.2f} ms (every stream's device events "
             "merged; the profiler slows the host, so idle time reads high)"]
    lines += [f"  gap {g['us'] / 1000:.3f} ms after {g['after'][:70]} before {g['before'][:70]}" for g in summary["gaps"]]
    return "\n".join(lines)
