"""The one place that decides what ``"auto"`` means for a run's speed options.

``training_parameters.json`` may leave any ``speed`` key at ``"auto"`` (the default); an explicit
value always wins. What auto picks, and why:

| option | auto on CUDA | auto on CPU | why |
|---|---|---|---|
| ``cuda_graphs`` | on | off | exact; removes kernel-launch overhead (results/bench/README.md) |
| ``autocast`` | the base dtype when the base is bf16/fp16, else off | off | a bf16 base already computes in bf16; autocast keeps the fp32 adapters from forcing fp32 copies of activations |
| ``compile`` | on for causal LMs | off | regional compile paid +29 % on Llama-3-8B (bench, H100); classification steps are launch-bound and graphs already remove that |
| ``packing`` | on for causal LMs | on for causal LMs | exact per-token loss with per-token weights; no pad tokens |
| ``micro_batch`` | probed at start (``loralab.step.probe_micro_batch``) | the experiment's ``batch_size`` | the optimizer batch never changes; only how it is cut into forwards |

The resolved values (no ``"auto"`` left) go into the result record under ``train_info.speed``.
"""

from __future__ import annotations

from typing import Any

import torch


def resolve_speed(speed: dict[str, Any], *, device: torch.device, kind: str, base_dtype: str) -> dict[str, Any]:
    """``speed`` with every ``"auto"`` replaced by the value for this run.

    ``kind`` is the task kind (``causal_lm`` or ``seq_cls``), ``base_dtype`` the experiment's
    ``dtype`` (``float32``, ``bfloat16``, ``float16``). ``micro_batch`` stays ``"auto"`` on CUDA:
    only a memory probe with the built model can settle it (``loralab.step``).
    """
    out = dict(speed)
    cuda = device.type == "cuda"
    causal = kind == "causal_lm"
    if out.get("cuda_graphs") == "auto":
        out["cuda_graphs"] = cuda
    if out.get("autocast") == "auto":
        out["autocast"] = base_dtype if cuda and base_dtype in ("bfloat16", "float16") else None
    if out.get("compile") == "auto":
        out["compile"] = cuda and causal
    if out.get("packing") == "auto":
        out["packing"] = causal
    if out.get("micro_batch") == "auto" and not cuda:
        out["micro_batch"] = None  # CPU: the experiment's batch_size per forward
    if out.get("cuda_graphs") and not cuda:
        out["cuda_graphs"] = False  # an explicit true on CPU: nothing to capture (logged by the runner)
    return out
