"""A run's micro-batch and what it leaves of the memory budget: ``make_step``'s part (``run/step.py``; issue 22).

``settle_micro_batch`` takes ``speed.micro_batch`` "auto" to the probe (``run/probe.probe_micro_batch``: 1, 2, 4, ...
within ``speed.memory_fraction`` of the GPU, the smallest over ranks), an explicit size as it is and, off CUDA or under
FSDP, the experiment's ``batch_size``. Then it spends what the chosen size leaves of the budget
(``run/spare_memory.py``): first ``speed.fp8_transpose_cache`` "auto" on the FP8 layers' column-major codes, then
``speed.activation_memory_budget`` "auto".

An explicit size on CUDA is measured once where "auto" would cache FP8 codes (``measure_micro_batch``): without a
measured peak nothing is spare, and "auto" cached nothing, so a run that only fixed its micro-batch lost the cache's
speed. On one H100 at the Llama-3-8B shape, FP8-base LoRA at an explicit micro-batch 4 ran 20,314 tokens/s at 16.5
GiB, and probed to the same size 21,852 at 25.9 GiB (the same card, two processes; results/bench-fair-h100-1207c,
calls 2 and 1); the probed run also kept every layer's codes and ran ``activation_memory_budget`` 1.0, where the
explicit one ran neither. One size measured gives no slope per row, so ``spend_spare_on_activations`` leaves the
budget at 0.8 here: the cache alone is what this measurement buys, 1.054x and 1.056x at one micro-batch
(results/bench-transposecache-h100), and 1.017x of the 1.076x above is the other setting's (results/bench-speedab-h100).
The measurement is one untimed and two timed forward+backward passes at that size (capped at the optimizer batch,
as the probe is) through the compiled layers; where codes are then cached, the new buffer fails the layers'
guards and they compile once more, as after a one-size probe.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from loralab import distributed
from loralab.run.probe import (
    Decision,
    budget_and_state,
    decide_micro_batch,
    probe_micro_batch,
    probe_record,
    worst_case_measurer,
)
from loralab.run.spare_memory import cache_spare_transposes, spare_bytes, spend_spare_on_activations
from loralab.speed.fast_dora import reusing_dora_norms
from loralab.speed.fp8 import fp8_layers
from loralab.speed.step import uses_fused_loss
from loralab.speed_settings import LOSS_CHUNK, Speed

MEASURED_FOR_CACHE = "speed.fp8_transpose_cache auto spends what it leaves of the budget"


def forget_probe_compiles() -> bool:
    """Drop every compiled graph (``torch.compiler.reset``) after a micro-batch probe that ran more than one
    size through the compiled layers; returns True (False where a diagnostic patches it out). Why: dynamo's
    automatic dynamic shapes compile a layer again for the second size it sees with the batch dimension
    symbolic, and that graph then serves every size, the chosen one included, so the step would capture its
    CUDA graphs from it: on an H100 the 8B FP8 DoRA step ran 140.4 ms against 134.6 ms after the reset
    (one row each, results/bench-probereset-h100; which kernels slow down was not profiled). Reset, the step
    compiles its micro-batch's shape statically, as a run with an explicit ``speed.micro_batch`` does; the
    price is one more compile of the layers (the probe's two, the step's one). Global: compiled code of other
    models in the process (a sweep's earlier experiments, ``fast_dora``'s compiled norm) compiles again on
    its next call."""
    torch.compiler.reset()
    return True


def measure_micro_batch(model, features: list[dict], *, size: int, kind: str, packing: bool, max_length: int,
                        pad_id: int, device: torch.device, memory_fraction: float,
                        optimizer: torch.optim.Optimizer | None = None, why: str = "") -> dict:
    """An explicit micro-batch ``size`` measured once on a CUDA ``device`` as the probe measures each size (the worst
    case of ``features``, ``optimizer``'s state to come counted), for what it leaves of the ``memory_fraction``
    budget (``spare_bytes``); the size is taken as it is, whatever it peaks at. Returns a ``probe_record`` of that
    one trial, reason "explicit: speed.micro_batch" and ``why`` it was measured, ``loss_chunk_size`` None (the
    chunk is fixed). Weights are not changed (gradients dropped, RNG restored). Raises ValueError off CUDA."""
    measure, width = worst_case_measurer(model, features, kind=kind, packing=packing, max_length=max_length,
                                         pad_id=pad_id, device=device)
    budget, held = budget_and_state(device, memory_fraction, optimizer)
    with torch.random.fork_rng(devices=[device]):
        trial = measure(size)
    decision = Decision(size, None, "explicit: speed.micro_batch" + (f"; measured once: {why}" if why else ""))
    record = probe_record([trial], decision, budget=budget, memory_fraction=memory_fraction, row_tokens=width,
                          min_gain=None, held=held)
    record["loss_chunk_size"] = None
    return record


def settle_micro_batch(model, resolved: Speed, settings: Speed, *, kind: str, features: list[dict], batch_size: int,
                       limit: int, max_length: int, pad_id: int, device: torch.device, optimizer, dora_layers: int,
                       log: Callable[[str], None] = print) -> int:
    """The micro-batch the step runs (module docstring), with what it leaves spent: sets ``resolved.micro_batch``,
    ``resolved.micro_batch_probe`` (the choice, the reason, every measurement), ``loss_chunk_size`` (probed where
    "auto", else ``LOSS_CHUNK``), ``fp8_transpose_cache`` and ``activation_memory_budget`` where "auto" (``settings``:
    the experiment's values before resolving). ``dora_layers``: fast DoRA layers whose norms the step refreshes once a
    step (the measured forwards read them, as the step's do). Returns the micro-batch."""
    micro, measured = resolved.micro_batch, None  # measured: the size measured for an explicit one larger than a forward
    norms = reusing_dora_norms() if dora_layers else contextlib.nullcontext()  # the forwards the step will run
    if micro == "auto":  # CUDA: probed with the built model
        # a causal LM's fused loss: the probe may shrink its chunk (a head it does not take, e.g. DoRA's, has none)
        auto_chunk = resolved.loss_chunk_size == "auto" and kind == "causal_lm" and uses_fused_loss(model)
        with norms:
            micro, probe = probe_micro_batch(
                model, features, kind=kind, packing=resolved.packing, max_length=max_length, limit=limit, pad_id=pad_id,
                device=device, memory_fraction=resolved.memory_fraction, optimizer=optimizer, log=log,
                loss_chunk=(lambda n: setattr(resolved, "loss_chunk_size", n)) if auto_chunk else None)
        probe["compiled_code_reset"] = bool(resolved.compile and len(probe["sizes"]) > 1 and forget_probe_compiles())
        if probe["compiled_code_reset"]:
            log(f"the probe's compiled code (sizes {probe['sizes']}) dropped: the step compiles micro-batch {micro} "
                "again, with no symbolic size")
        own = micro
        micro = distributed.min_over_ranks(micro)  # one micro-batch for every rank
        probe["micro_batch"] = micro
        if auto_chunk:  # a rank whose own size is larger measured the common one at the default chunk, within budget
            chunk = resolved.loss_chunk_size if own == micro else LOSS_CHUNK
            resolved.loss_chunk_size = probe["loss_chunk_size"] = distributed.min_over_ranks(chunk)
    elif micro is not None and device.type == "cuda" and resolved.fp8_transpose_cache == "auto" and fp8_layers(model):
        with norms:  # no larger than a forward ever runs (the step takes at most the optimizer batch)
            probe = measure_micro_batch(model, features, size=min(micro, limit), kind=kind, packing=resolved.packing,
                                        max_length=max_length, pad_id=pad_id, device=device,
                                        memory_fraction=resolved.memory_fraction, optimizer=optimizer,
                                        why=MEASURED_FOR_CACHE)
        probe["micro_batch"], measured, peak = micro, min(micro, limit), probe["peaks_gib"][0]
        log(f"micro-batch {micro} (explicit; measured once for speed.fp8_transpose_cache auto: "
            f"{'out of memory' if peak == 'oom' else f'peak {peak} GiB'} against a budget of {probe['budget_gib']} GiB)")
    else:
        why = "explicit: speed.micro_batch" if micro is not None else (
            f"not probed on {device.type}: the experiment's batch_size" if device.type != "cuda"
            else "not probed under FSDP: the experiment's batch_size")
        micro = batch_size if micro is None else micro
        decision = decide_micro_batch([], limit=limit, budget=None, explicit=micro)
        probe = probe_record([], decision, budget=None, memory_fraction=None, row_tokens=None, min_gain=None)
        probe["reason"] = why
    spare = distributed.min_over_ranks(spare_bytes(probe, measured or micro, resolved.loss_chunk_size) or -1)  # least over ranks
    if resolved.fp8_transpose_cache == "auto":  # what the micro-batch leaves of the budget; a new buffer fails the
        # compiled layers' guards, so a layer compiled by a one-size probe compiles again
        resolved.fp8_transpose_cache = cache_spare_transposes(model, resolved, spare, probe.get("budget_gib"), log)
    if settings.activation_memory_budget == "auto":  # then what is left, on the activations of torch's default partition
        spend_spare_on_activations(model, resolved, probe, micro, spare, log)
    if resolved.loss_chunk_size == "auto":  # not probed (explicit micro-batch, FSDP): the default chunk
        resolved.loss_chunk_size = LOSS_CHUNK
    resolved.micro_batch, resolved.micro_batch_probe = micro, probe
    return micro
