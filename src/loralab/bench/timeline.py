"""Where a profiled step leaves the GPU idle: the union of its device intervals against their span.

A saving measured on a kernel alone reaches the step only where the GPU is busy end to end: if the step waits on the
host between graph replays, a faster kernel may only lengthen a gap (results/bench-fair-h100-1207e: the DoRA refresh
0.28 ms faster alone, graphed, and the step not 0.01 ms faster). ``loralab bench --profile`` (``runner._profile``)
prints this summary under each row's kernel table, from the profiler's device events (kernels, copies, sets) on
every stream, overlapping ones merged.
"""

from __future__ import annotations

GAPS_SHOWN = 5


def timeline(events: list[tuple[float, float, str]], gaps_shown: int = GAPS_SHOWN) -> dict:
    """Busy and idle time of a device over ``events``: (start, end, name) in microseconds, any order, on any streams.

    Returns ``span_us`` (first start to last end), ``busy_us`` (the union of the intervals: overlap counted once),
    ``idle_us`` (span - busy), ``busy_share`` and ``gaps``: the ``gaps_shown`` longest idle stretches, longest first,
    each ``{"us", "after", "before"}`` with the names of the event that ended last before it and the one that starts
    it. Raises ValueError for no events or an event that ends before it starts."""
    if not events:
        raise ValueError("timeline: no device events (was the profile taken on a GPU?)")
    bad = [e for e in events if e[1] < e[0]]
    if bad:
        raise ValueError(f"timeline: {len(bad)} event(s) end before they start, e.g. {bad[0]}")
    ordered = sorted(events)
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
    """``timeline``'s summary as lines under a profile table, per step where ``steps`` > 0."""
    per = max(steps, 1)
    lines = [f"GPU timeline over {steps} step(s): span {summary['span_us'] / 1000 / per:.2f} ms a step, busy "
             f"{summary['busy_us'] / 1000 / per:.2f} ms ({summary['busy_share']:.1%}), idle "
             f"{summary['idle_us'] / 1000 / per:.2f} ms (every stream's device events merged)"]
    lines += [f"  gap {g['us'] / 1000:.3f} ms after {g['after'][:70]} before {g['before'][:70]}" for g in summary["gaps"]]
    return "\n".join(lines)
