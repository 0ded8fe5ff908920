"""The DoRA diagnostic scripts measure what they say: the ablation's variants change only their part of the
step, and the refresh's alternative product forms compute the shipped values (scripts/dora_ablation_bench.py,
scripts/fp8_refresh_gemm_bench.py; issue 22's DoRA goal)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from loralab.run import step as run_step

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_refresh_products_alternative_forms_give_the_shipped_values():
    """The W·Aᵀ product with the terms on the left is the shipped one transposed, bit for bit (same products,
    one rounding to bf16 each); the Gram matrix split over K is the whole bmm up to summation order."""
    bench = _script("fp8_refresh_gemm_bench")
    rows = bench.bench(rank=4, layers=3, repeats=1, device="cpu", shapes={"small": (48, 64), "wide": (32, 128)})
    assert [r["layers"] for r in rows] == ["small", "wide"]
    for r in rows:
        assert r["product_max_rel_diff"] == 0.0
        assert r["gram_max_rel_diff"] < 1e-6


@pytest.mark.slow  # six bench rows of the tiny preset on CPU (~15 s)
def test_the_ablation_freezes_magnitudes_and_refreshes_once_only_where_asked(tmp_path):
    ablation = _script("dora_ablation_bench")
    refresh = run_step.refresh_dora_norms
    out = tmp_path / "abl.json"
    ablation.main(["--device", "cpu", "--preset", "tiny", "--only", "tiny-llama/fixed", "--bases", "fp8", "bf16",
                   "--variants", "dora", "dora-frozen-m", "dora-norm-once", "--micro-batch", "2",
                   "--steps", "2", "--warmup", "1", "--output", str(out)])
    rows = {(r["base"], r["variant"]): r for r in json.loads(out.read_text())}
    assert run_step.refresh_dora_norms is refresh  # the step's own refresh is back after the variant
    for base in ("fp8", "bf16"):
        assert rows[base, "dora"]["frozen_magnitudes"] == 0 and rows[base, "dora"]["refresh_ms"] > 0
        # the tiny Llama's 2 layers x 7 adapted projections: every magnitude frozen, none else
        assert rows[base, "dora-frozen-m"]["frozen_magnitudes"] == 14
        # make_step's own refresh, then every step's call (1 warm-up, the first of its shape, 2 timed) a no-op
        assert rows[base, "dora-norm-once"]["refresh_calls"] == 5
        assert rows[base, "dora-norm-once"]["method"] == ("fp8+dora" if base == "fp8" else "dora")
