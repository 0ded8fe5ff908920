"""What a method may ask of the run: its parameters, the training features and the tokenizer, and
the calibration samples of data-driven inits (CorDA, ...)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MethodContext:
    """What a method may ask of the run: calibration data for data-driven inits."""

    params: object
    train_features: list
    tokenizer: object

    def calibration_samples(self) -> list[dict]:
        cal = self.params.calibration
        if cal["dataset"] is not None:
            from loralab.decomposition.calibration import calibration_samples  # seed 001's calibration sets

            samples, _ = calibration_samples(
                cal["dataset"], self.tokenizer, cal["num_samples"], seed=cal["seed"], seqlen=cal["seqlen"],
                data_dir=self.params.data_dir, fmt=cal["format"], sampling=cal["sampling"],
            )
            return [{"input_ids": s.tolist(), "attention_mask": [1] * len(s)} for s in samples]
        n = min(cal["num_samples"], len(self.train_features))
        if cal["sampling"] == "first":
            idx = range(n)
        else:
            idx = sorted(np.random.default_rng(cal["seed"]).permutation(len(self.train_features))[:n].tolist())
        return [{k: v for k, v in self.train_features[i].items() if k != "labels"} for i in idx]
