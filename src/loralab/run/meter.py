"""What a run measures about its speed: warm-up vs steady timing windows, tokens/s, memory.

Steps run ahead of the host on CUDA, so time is charged in windows that close at the steps where
the loop synchronises anyway (logging, checkpoints, a stop). A window is *steady* when none of its
steps captured a new CUDA graph and it does not hold step 1 (CUDA/cuBLAS initialisation, compile);
every other window is warm-up. ``tokens_per_second`` in the record is steady tokens / steady time.
The counters live in the run's checkpoint state (``warmup_time``, ``steady_time``,
``steady_tokens``, ``steady_samples``, ``train_time``), so a resumed run keeps counting.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from loralab import results


class MemoryMeter:
    """CUDA: allocated memory sampled once per step (average, 99th percentile) and the peak;
    CPU: the process's peak resident set size. Units: bytes."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.samples: list[int] = []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self):
        """Record the allocated CUDA memory now (once per optimizer step); nothing on CPU."""
        if self.cuda:
            self.samples.append(torch.cuda.memory_allocated())

    def summary(self) -> dict:
        """``cuda_memory_avg``/``cuda_memory_max``/``cuda_memory_99th``, or ``peak_rss`` on CPU."""
        if not self.cuda:
            return {"peak_rss": results.peak_rss_bytes()}
        s = np.array(self.samples or [0])
        return {
            "cuda_memory_avg": int(s.mean()),
            "cuda_memory_max": int(torch.cuda.max_memory_allocated()),
            "cuda_memory_99th": int(np.percentile(s, 99)),
        }


class Meter:
    """Times optimizer steps into ``state``'s counters (seconds, tokens, samples) and samples memory.

    Per step: ``start(step)`` before it, ``stop(...)`` after it; ``sync`` True closes the window
    (after a device synchronisation on CUDA).
    """

    def __init__(self, device: torch.device, state: dict):
        self.device, self.state = device, state
        self.memory = MemoryMeter(device)
        self._new_window()

    def _new_window(self):
        self.window = {"t": 0.0, "tokens": 0, "samples": 0, "clean": True}

    def start(self, step_fn) -> None:
        """Before an optimizer step of ``step_fn`` (a ``run.step.Step``)."""
        self.t0 = time.perf_counter()
        self.graphs_before = step_fn.trainer.graphs

    def stop(self, step_fn, step: int, stats, sync: bool) -> None:
        """After optimizer step ``step`` (1-based) with ``stats`` (its ``StepStats``)."""
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize()  # steps run ahead of the host; charge their GPU time here
        dt = time.perf_counter() - self.t0
        state, window = self.state, self.window
        state["train_time"] += dt
        window["t"] += dt
        window["tokens"] += stats.tokens
        window["samples"] += stats.samples
        window["clean"] &= step_fn.trainer.graphs == self.graphs_before and step > 1
        if sync:
            key = "steady" if window["clean"] else "warmup"
            state[f"{key}_time"] += window["t"]
            if window["clean"]:
                state["steady_tokens"] += window["tokens"]
                state["steady_samples"] += window["samples"]
            self._new_window()

    def tokens_per_second(self) -> float | None:
        """Steady tokens/s so far; None before the first steady window."""
        state = self.state
        return state["steady_tokens"] / state["steady_time"] if state["steady_time"] else None

    def timing(self) -> dict:
        """The record's ``train_info.timing`` entries the meter owns (seconds and counts)."""
        state = self.state
        return {"warmup_s": state["warmup_time"], "steady_s": state["steady_time"],
                "steady_tokens": state["steady_tokens"], "steady_samples": state["steady_samples"]}
