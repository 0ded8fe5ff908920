"""bench/timeline.py: the GPU's busy and idle time in a profiled step, the measure that tells whether a kernel's
saving can reach the step (results/bench-fair-h100-1207e)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loralab.bench.timeline import device_intervals, timeline, timeline_text


def test_overlapping_streams_count_once_and_the_longest_gaps_name_their_neighbours():
    events = [(0.0, 100.0, "gemm"), (50.0, 120.0, "gram on a side stream"), (120.0, 130.0, "norms"),
              (400.0, 500.0, "forward"), (130.5, 140.0, "keep"), (1500.0, 1600.0, "optimizer")]
    got = timeline(events[::-1], gaps_shown=2)  # any order
    assert got["span_us"] == 1600.0
    assert got["busy_us"] == 140.0 + 100.0 + 100.0 - 0.5  # 0-130 and 130.5-140 merged apart, overlap once
    assert got["idle_us"] == pytest.approx(1600.0 - got["busy_us"])
    assert got["gaps"] == [{"us": 1000.0, "after": "forward", "before": "optimizer"},
                           {"us": 260.0, "after": "keep", "before": "forward"}]
    assert got["busy_share"] == pytest.approx(got["busy_us"] / 1600.0)
    text = timeline_text(got, steps=2)
    assert text.splitlines()[0].startswith("GPU timeline over 2 profiled step(s), first to last device event: span 0.80 "
                                           "ms a step, busy 0.17 ms (21.2%)")
    assert "gap 1.000 ms after forward before optimizer" in text


def test_an_event_inside_a_longer_one_keeps_the_longer_ones_end_and_name():
    got = timeline([(0.0, 100.0, "long"), (10.0, 20.0, "inside"), (150.0, 160.0, "next")])
    assert got["busy_us"] == 110.0 and got["gaps"] == [{"us": 50.0, "after": "long", "before": "next"}]


def test_touching_events_leave_no_gap_and_zero_length_ones_do_not_split_one():
    got = timeline([(0.0, 10.0, "a"), (10.0, 20.0, "b"), (50.0, 50.0, "instant"), (80.0, 90.0, "c")])
    assert got["busy_us"] == 30.0 and got["gaps"] == [{"us": 60.0, "after": "b", "before": "c"}]
    assert timeline([(0.0, 10.0, "a"), (0.0, 30.0, "same start")])["busy_us"] == 30.0


def test_no_events_or_a_backwards_event_is_refused():
    with pytest.raises(ValueError, match="no device events"):
        timeline([])
    with pytest.raises(ValueError, match="no device events of nonzero length"):
        timeline([(3.0, 3.0, "instant")])
    with pytest.raises(ValueError, match="1 event\\(s\\) end before they start"):
        timeline([(5.0, 1.0, "bad")])


def _event(device, start, end, name, annotation=False, activity="kernel"):
    return SimpleNamespace(device_type=getattr(torch.autograd.DeviceType, device), is_user_annotation=annotation,
                           activity_type=activity, time_range=SimpleNamespace(start=start, end=end), name=name)


def test_the_profilers_device_events_are_kept_and_cpu_ops_and_annotated_ranges_left_out():
    """``device_intervals`` over profiler-like events: a CPU op (its kernels come as their own CUDA events), a
    device-side annotation spanning idle time (by its flag, or by its activity type alone), a copy, a kernel and
    one ending before it starts (dropped and counted)."""
    events = [_event("CPU", 0.0, 500.0, "aten::mm"), _event("CUDA", 0.0, 900.0, "step", annotation=True),
              _event("CUDA", 0.0, 900.0, "range", activity="gpu_user_annotation"),
              _event("CUDA", 10.0, 20.0, "Memcpy HtoD", activity="gpu_memcpy"), _event("CUDA", 100.0, 150.0, "gemm"),
              _event("CUDA", 200.0, 190.0, "clock skew")]
    kept, dropped = device_intervals(events)
    assert kept == [(10.0, 20.0, "Memcpy HtoD"), (100.0, 150.0, "gemm")] and dropped == 1
    assert timeline(kept)["idle_us"] == 80.0
