"""What a reader sees in the report's figures (issue 24.6): methods evaluated once at the end are
shown side by side, not as one column of overlapping dots; lines that coincide (the same
learning-rate schedule) stay visible; two methods never get near-identical colours. Checked on the
SVG that the page embeds, built from real MiniLM GLUE records."""

import itertools
import re

import numpy as np
import pytest
from report_records import make_record, write

from loralab.report.build import build_report
from loralab.report.plots import PALETTE, colours, curves_svg
from loralab.report.records import DISPLAY
from loralab.report.tables import METHOD_ORDER

MIN_DELTA_E = 35.0  # CIELAB ΔE76 between any two colours of one report (tab10's purple/pink: 28)


def lab(hex_colour: str) -> np.ndarray:
    """CIELAB (D65) of an sRGB ``#rrggbb`` colour."""
    rgb = np.array([int(hex_colour.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)])
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ linear
    f = np.cbrt(np.maximum(xyz / np.array([0.95047, 1.0, 1.08883]), 0.008856))
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def delta_e(a: str, b: str) -> float:
    return float(np.linalg.norm(lab(a) - lab(b)))


def group(svg: str, gid: str) -> str:
    """The SVG of what was drawn with ``gid``: from its group to the next group with an id."""
    start = svg.find(f'<g id="{gid}">')
    assert start >= 0, f"nothing drawn as {gid}"
    end = svg.find('<g id="', start + 1)
    return svg[start:end if end > 0 else None]


def runs(tmp_path, methods=("lora", "dora", "pissa"), seeds=(0, 1), edit=None):
    for method in methods:
        for seed in seeds:
            rec = make_record(method, "mrpc", name=f"s/{method}/mrpc", seed=seed)
            rec["eval"]["accuracy"] += 0.01 * seed  # seeds differ
            if edit:
                edit(method, rec)
            write(tmp_path, f"{method}{seed}.json", rec)
    return build_report([tmp_path]).used


def test_methods_of_one_report_have_clearly_different_colours():
    labels = METHOD_ORDER + ["CorDA (KPA)"]  # twelve methods
    colour = colours(labels)
    assert len(set(colour.values())) == len(labels)
    closest = min(delta_e(colour[a], colour[b]) for a, b in itertools.combinations(labels, 2))
    assert closest >= MIN_DELTA_E
    assert min(lab(c)[0] for c in PALETTE if c != "#000000") < 75  # none too light for a line on white


def test_a_method_keeps_its_colour_from_report_to_report():
    everything = colours(METHOD_ORDER)
    for labels in (["DoRA"], ["PiSSA", "LoRA"], ["SVD LoRA-FA", "DoRA", "Full FT"]):
        assert {k: everything[k] for k in labels} == colours(labels)
    assert colours(["LoRA (r=4)"])["LoRA (r=4)"] == everything[DISPLAY["lora"]]  # a variant alone: its method's colour
    both = colours(["LoRA", "LoRA (r=4)"])
    assert delta_e(both["LoRA"], both["LoRA (r=4)"]) >= MIN_DELTA_E


def test_eval_panel_of_runs_evaluated_once_shows_methods_side_by_side(tmp_path):
    used = runs(tmp_path)
    assert not any(any(k.startswith("eval ") for e in r.history for k in e) for r in used)  # evaluated at the end only
    colour = colours(["LoRA", "DoRA", "PiSSA"])
    svg, drawn = curves_svg(used, "glue/mrpc", colour)
    xs = {}
    for label in colour:
        assert colour[label].lower() in group(svg, f"final-{label}")
        xs[label] = float(re.search(r'd="M ([\d.]+) ', group(svg, f"final-{label}")).group(1))
        seeds = [float(x) for x in re.findall(r'<use [^>]* x="([\d.]+)"', group(svg, f"seeds-{label}"))]
        assert len(seeds) == 2 and abs(seeds[0] - seeds[1]) >= 4  # each seed its own dot
    assert min(abs(a - b) for a, b in itertools.combinations(xs.values(), 2)) >= 40  # pixels apart, not stacked
    assert [x for _, x in sorted((x, label) for label, x in xs.items())] == list(colour)  # in the table's order
    texts = re.findall(r"<!-- (.*?) -->", svg)
    assert {"LoRA", "DoRA", "PiSSA"} <= set(texts)  # the methods name the columns
    assert {"LoRA: final accuracy", "DoRA: final accuracy", "PiSSA: final accuracy"} <= set(drawn)


def dashes(svg: str, gid: str) -> tuple | None:
    style = re.search(r'style="([^"]*)"', group(svg, gid)).group(1)
    array = re.search(r"stroke-dasharray: ([\d.,]+)", style)
    if array is None:
        return None
    offset = re.search(r"stroke-dashoffset: ([\d.]+)", style)
    return tuple(float(v) for v in array.group(1).split(",")), float(offset.group(1)) if offset else 0.0


def test_coinciding_learning_rate_lines_are_all_visible(tmp_path):
    def double_pissa_lr(method, rec):
        if method == "pissa":
            for entry in rec["train_info"]["metrics"]:
                if "lr" in entry:
                    entry["lr"] *= 2

    svg, _ = curves_svg(runs(tmp_path, edit=double_pissa_lr), "glue/mrpc", colours(["LoRA", "DoRA", "PiSSA"]))
    lora, dora = dashes(svg, "lr-LoRA"), dashes(svg, "lr-DoRA")
    assert lora and dora  # the same schedule: both dashed ...
    assert sum(lora[0]) == pytest.approx(sum(dora[0]))  # ... with one period ...
    assert abs(lora[1] - dora[1]) >= min(lora[0][0], dora[0][0]) * 0.99  # ... and their dashes in turn, not on top
    assert dashes(svg, "lr-PiSSA") is None  # a schedule of its own stays solid
