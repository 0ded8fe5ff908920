"""scripts/refresh_product_sweep.py on CPU (Triton's interpreter, tests/conftest.py): every launch of a grid gives the
default launch's values, a launch that cannot run is listed with its error instead of ending the sweep, the rows come
fastest first, and the kernel's launch globals are as they were after it."""

import os

import pytest

from loralab.speed import fp8_kernels

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter (no CUDA)")


def test_a_sweep_times_every_launch_checks_its_values_and_restores_the_default(load_script, monkeypatch):
    sweep = load_script("refresh_product_sweep")
    before = (fp8_kernels.WA_BLOCK_N, fp8_kernels.WA_BLOCK_K, fp8_kernels.WA_WARPS, fp8_kernels.WA_STAGES)
    grid = [(64, 64, 4, 3), (128, 64, 8, 3), (64, 48, 4, 3)]  # 48: not a power of two, tl.arange refuses it
    out = sweep.sweep(grid, rank=8, repeats=1, device="cpu", groups={"a": (96, 128, 2), "b": (64, 256, 1)})
    assert (fp8_kernels.WA_BLOCK_N, fp8_kernels.WA_BLOCK_K, fp8_kernels.WA_WARPS, fp8_kernels.WA_STAGES) == before
    assert set(out["shipped"]) == {"a", "b"} and out["codes_gb"] == (96 * 128 * 2 + 64 * 256) / 1e9
    ran = [r for r in out["launches"] if "error" in r]
    assert [r["launch"] for r in ran] == [[64, 48, 4, 3]]
    timed = [r for r in out["launches"] if "error" not in r]
    assert {tuple(r["launch"]) for r in timed} == set(grid[:2])
    assert all(r["max_rel_diff"] < 1e-6 and set(r["ms"]) == {"a", "b"} for r in timed)
    assert [r["total_ms"] for r in timed] == sorted(r["total_ms"] for r in timed) and out["launches"][-1] is ran[0]
