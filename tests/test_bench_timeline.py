"""bench/timeline.py: the GPU's busy and idle time in a profiled step, the measure that tells whether a kernel's
saving can reach the step (results/bench-fair-h100-1207e)."""

from __future__ import annotations

import pytest

from loralab.bench.timeline import timeline, timeline_text


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
    assert text.splitlines()[0].startswith("GPU timeline over 2 step(s): span 0.80 ms a step, busy 0.17 ms (21.2%)")
    assert "gap 1.000 ms after forward before optimizer" in text


def test_an_event_inside_a_longer_one_keeps_the_longer_ones_end_and_name():
    got = timeline([(0.0, 100.0, "long"), (10.0, 20.0, "inside"), (150.0, 160.0, "next")])
    assert got["busy_us"] == 110.0 and got["gaps"] == [{"us": 50.0, "after": "long", "before": "next"}]


def test_no_events_or_a_backwards_event_is_refused():
    with pytest.raises(ValueError, match="no device events"):
        timeline([])
    with pytest.raises(ValueError, match="1 event\\(s\\) end before they start"):
        timeline([(5.0, 1.0, "bad")])
