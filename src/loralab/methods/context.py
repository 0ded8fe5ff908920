"""What a method may ask of the run: its parameters, the training features and the tokenizer, and
the calibration batches of data-driven inits (CorDA, EVA, LoRA-GA).

Calibration feeds the model exactly what training feeds it: the task's own tokenized features
(``token_type_ids`` of BERT sentence pairs included) batched by ``loralab.data.collate``, the
function the training loop batches with. A named calibration set (``calibration.dataset``) has
plain text, so its rows carry ``input_ids`` and ``attention_mask`` only.

Where the rows came from is kept in ``MethodContext.calibration_provenance`` for the run's record
(the file or hub split, its split beside the official one, and ``overlaps_evaluations``: the run's
evaluations that score that very text, e.g. ``nqopen`` calibrated on the local NQ-open dev file
that ``nq_open`` scores; such an overlap is also printed as a warning).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MethodContext:
    """What a method may ask of the run: calibration data for data-driven inits."""

    params: object
    train_features: list
    tokenizer: object
    float_weights: dict | None = None
    """On an NF4 base, the original weights ({module name: (out, in) float tensor}) for inits that
    fit the quantisation error (LoftQ); set by ``Method.apply`` before it quantises."""
    calibration_provenance: dict | None = None
    """Set by ``calibration_samples`` (None until an init asks for calibration data): a named set's
    ``source`` (file, or ``hub:path/config/split``), ``split``, ``official_split``, ``note``, ``name``,
    ``num_samples``, ``seed``, ``seqlen``, ``fmt``, ``sampling``; the task's own rows:
    ``{"source": "task", "task", "split": "train", "num_samples", "seed", "sampling"}``. Both with
    ``overlaps_evaluations`` (list of evaluation names, [] for none) and, when not empty,
    ``overlap_note``. JSON-serialisable, for the run's record."""

    def calibration_samples(self, labels: bool = False) -> list[dict]:
        """The calibration rows (``params.calibration``: dataset, num_samples, seed, sampling), as
        training features: dicts of token lists (``input_ids``, ``attention_mask``, and
        ``token_type_ids`` where the task has them). ``labels=True`` keeps the training label (a
        named text set gets its input ids as causal-LM labels)."""
        cal = self.params.calibration
        if cal["dataset"] is not None:
            from loralab.decomposition.calibration import calibration_samples  # seed 001's calibration sets

            samples, provenance = calibration_samples(
                cal["dataset"], self.tokenizer, cal["num_samples"], seed=cal["seed"], seqlen=cal["seqlen"],
                data_dir=self.params.data_dir, fmt=cal["format"], sampling=cal["sampling"],
            )
            self._keep_provenance(provenance)
            rows = [{"input_ids": s.tolist(), "attention_mask": [1] * len(s)} for s in samples]
            return [r | {"labels": list(r["input_ids"])} for r in rows] if labels else rows
        n = min(cal["num_samples"], len(self.train_features))
        self._keep_provenance({"source": "task", "task": self.params.task, "split": "train", "num_samples": n,
                               "seed": cal["seed"], "sampling": cal["sampling"]})
        if cal["sampling"] == "first":
            idx = range(n)
        else:
            idx = sorted(np.random.default_rng(cal["seed"]).permutation(len(self.train_features))[:n].tolist())
        return [{k: v for k, v in self.train_features[i].items() if labels or k != "labels"} for i in idx]

    def evaluations(self) -> list[str]:
        """The evaluations this run scores (the task's defaults when ``eval_tasks`` is unset)."""
        from loralab.config import ConfigError
        from loralab.tasks import get_task

        try:
            return list(get_task(self.params.task).eval_names(self.params))
        except (ConfigError, AttributeError):  # GLUE tasks score their dev split: no named evaluation
            return list(self.params.eval_tasks or [])

    def _keep_provenance(self, provenance: dict) -> None:
        from loralab.decomposition.overlap import overlap_provenance

        self.calibration_provenance = overlap_provenance(
            provenance, self.evaluations(), self.params.data_dir, f"calibration.dataset {self.params.calibration['dataset']!r}")

    def calibration_batches(self, device=None, labels: bool = False) -> list[dict]:
        """``calibration_samples`` in batches of ``calibration.batch_size`` (longest rows first, so
        little is padded), padded by the training collate; tensors on ``device``. Pads carry
        attention_mask 0 and never enter a statistic. Where masked attention on ``device`` may run cuDNN's kernel, a
        padded batch 64 modulo 128 tokens wide is padded 16 further (``speed.attention``, pytorch/pytorch#196678: LoRA-GA
        backpropagates through these batches)."""
        import torch

        from loralab.data import collate, pad_id
        from loralab.speed.attention import MaskedWidths

        rows = self.calibration_samples(labels=labels)
        rows = sorted(rows, key=lambda r: -len(r["input_ids"]))
        size = self.params.calibration["batch_size"]
        # LoRA-GA's backward: no NaN; eager widths (no CUDA graphs here), the longest row first in each chunk
        widths = MaskedWidths(torch.device(device or "cpu"), False, log=lambda line: None)
        batches = [collate(chunk, pad_id(self.tokenizer), widths(len(chunk[0]["input_ids"]), chunk))
                   for chunk in (rows[i : i + size] for i in range(0, len(rows), size))]
        if device is not None:
            batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        return batches
