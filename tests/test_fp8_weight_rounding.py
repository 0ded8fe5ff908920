"""scripts/fp8_weight_rounding.py: its per-row rounding is loralab's FP8 base's bit for bit, finer
blocks confine an outlier's scale, and bf16 rounds below every FP8 granularity. Small random matrices
(no model, no data), CPU, a few seconds."""

import pytest
import torch

from loralab.speed.fp8 import quantize_rows


@pytest.fixture
def script(load_script):
    return load_script("fp8_weight_rounding")


def gaussian(rows, cols, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("shape", [(256, 512), (192, 576), (3, 5)])
def test_per_row_blocks_are_loralab_quantize_rows_bitwise(script, shape):
    # 576 and 192 are SmolLM2's ragged widths (not multiples of 128)
    w = gaussian(*shape)
    w[1, 2] = 0.0  # an exact zero and a row of zeros (EPS scale)
    w[-1] = 0.0
    codes, scales, _ = script.quantize_blocks(w, 1, None)
    ref_codes, ref_scales = quantize_rows(w)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
    assert torch.equal(scales, ref_scales)
    deq, _, same = script.round_trip(w, "per-row")
    assert same
    assert torch.equal(deq, script.dequantize_blocks(codes, scales, 1, None))


def test_ragged_blocks_round_trip_every_weight(script):
    """Edge blocks of a shape not divisible by 128 are scaled by their own amax: every weight comes back
    within e4m3's relative step (2**-4 of its normal values), none dropped or shifted by the padding."""
    w = gaussian(200, 300) + 0.5  # positive, far from e4m3's subnormal range in every block
    for granularity in ("1x128", "128x128"):
        deq, subnormal, _ = script.round_trip(w, granularity)
        assert deq.shape == w.shape
        assert subnormal == 0
        assert ((deq - w).abs() <= w.abs() * 2.0 ** -4).all()


def test_an_outlier_costs_its_row_less_with_1x128_blocks(script):
    """An element 1e5 sigma out sets its row's scale so high that the row's other weights fall into e4m3's
    subnormal range (step 2**-9 of the scale); with 1x128 blocks only its own block's do. (At 1e3 sigma
    the scaled weights stay normal and the two errors differ only by chance.)"""
    w = gaussian(256, 512)
    w[7, 100] = 1e5 * 0.02
    x = gaussian(64, 512, seed=1) / 0.02
    errors = script.measure(w, x)
    assert errors["1x128"]["weight_error"] < errors["per-row"]["weight_error"]
    assert errors["1x128"]["product_error"] < errors["per-row"]["product_error"]
    assert errors["1x128"]["subnormal_fraction"] < errors["per-row"]["subnormal_fraction"]
    # the outlier row's 384 weights outside the outlier's block keep a fine scale with 1x128
    row = w[7:8]
    per_row, _, _ = script.round_trip(row, "per-row")
    blocks, _, _ = script.round_trip(row, "1x128")
    assert (row - blocks)[:, 128:].norm() < 0.5 * (row - per_row)[:, 128:].norm()


def test_error_and_subnormals_order_coarse_to_fine_with_outliers(script):
    w = gaussian(256, 512)
    w[3, 5], w[200, 400] = 1e4 * 0.02, -3e3 * 0.02  # a few outliers: many scaled weights fall subnormal
    x = gaussian(64, 512, seed=1) / 0.02
    errors = script.measure(w, x)
    order = ["per-tensor", "per-row", "1x128"]
    weight = [errors[g]["weight_error"] for g in order]
    product = [errors[g]["product_error"] for g in order]
    subnormal = [errors[g]["subnormal_fraction"] for g in order]
    assert weight == sorted(weight, reverse=True)
    assert product == sorted(product, reverse=True)
    assert subnormal == sorted(subnormal, reverse=True) and subnormal[0] > 0.1
    assert errors["per-row"]["per_row_bitwise"]


@pytest.mark.parametrize("outlier", [None, 1e3])
def test_bf16_rounds_below_every_fp8_granularity(script, outlier):
    w = gaussian(256, 512)
    if outlier:
        w[0, 0] = outlier * 0.02
    errors = script.measure(w, gaussian(64, 512, seed=1))
    for g in script.GRANULARITIES:
        assert errors["bf16"]["weight_error"] < errors[g]["weight_error"] / 4
        assert errors["bf16"]["product_error"] < errors[g]["product_error"] / 4


def test_table_rows_summarize_matrices(script):
    x = gaussian(8, 256, seed=1)
    matrices = [{"name": str(i), "numel": 128 * 256, "errors": script.measure(gaussian(128, 256, seed=i), x)}
                for i in range(3)]
    rows = script.summarize("toy", matrices)
    assert [r["rounding"] for r in rows] == ["bf16", "per-tensor", "per-row", "1x128", "128x128"]
    per_row = next(r for r in rows if r["rounding"] == "per-row")
    errs = sorted(m["errors"]["per-row"]["weight_error"] for m in matrices)
    assert per_row["weight_error_median"] == errs[1] and per_row["weight_error_max"] == errs[2]
    assert rows[0]["subnormal_fraction"] is None
    text = script.table(rows)
    assert text.count("\n") == 1 + len(rows) and "| toy | bf16 | 3 |" in text
