"""One timing rule for the kernel benches in scripts/ (fp8_quant_bench, fp8_refresh_gemm_bench,
dora_ablation_bench): the median milliseconds of a call, after untimed warm-up calls. A script run as
``python scripts/<name>.py`` has this folder on ``sys.path``; tests load the scripts with it there
(tests/conftest.py, ``load_script``)."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, iters: int, warmup: int = 1, device: str = "cuda") -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls after ``warmup`` untimed ones. On CUDA each call
    is timed by a pair of CUDA events and synchronised (the GPU's time for the work it queued); elsewhere by
    the host clock (on CPU the scripts check their forms agree, not their speed). Raises ValueError for
    ``iters`` < 1."""
    if iters < 1:
        raise ValueError(f"median_ms: iters must be >= 1, got {iters}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)
