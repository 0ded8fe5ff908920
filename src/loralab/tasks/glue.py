"""GLUE classification and regression tasks (seed 000's table: CoLA, SST-2, MRPC, QNLI, RTE, STS-B).

Training uses the train split, evaluation the validation (dev) split, as seed 000 did; or, for
choosing hyper-parameters without touching dev, ``eval_split: "holdout"``: a fixed random
``holdout_fraction`` of the train split (drawn with ``holdout_seed``, the same rows for every
method and training seed) is evaluated on and left out of training. Metrics are
the GLUE ones, computed with scipy/scikit-learn rather than ``evaluate`` (which downloads metric code
at run time): CoLA Matthews correlation, MRPC accuracy + F1, STS-B Pearson + Spearman (regression
head, ``num_labels=1``), the rest accuracy; a degenerate one (a constant prediction's correlation,
F1 without a positive prediction) is scored 0 and flagged, by the rule in ``tasks.metrics``.

Data: a local folder in the classic GLUE TSV layout (``<data_dir>/glue/<Task>/{train,dev}.tsv`` or
``<data_dir>/<Task>/...``) or the hub (``nyu-mll/glue``) when no data_dir is given.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loralab.data import collate, pad_id
from loralab.results import sha256_file
from loralab.tasks.metrics import score_all, settle

HUB_ID = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str  # GLUE TSV folder name
    hub_name: str
    text_fields: tuple[str, ...]  # hub column names
    tsv_columns: tuple  # (text column(s)..., label column) by header name or index
    has_header: bool
    num_labels: int
    metrics: tuple[str, ...]
    kind: str = "seq_cls"

    # ---- data -------------------------------------------------------------------------------
    def folder_path(self, data_dir) -> Path:
        root = Path(data_dir).expanduser()
        return root / "glue" / self.folder if (root / "glue").is_dir() else root / self.folder

    def check(self, params) -> list[str]:
        problems = check_holdout(params)
        if not params.data_dir:
            return problems
        if not Path(params.data_dir).expanduser().is_dir():
            return problems + [f"'data_dir' = {params.data_dir!r}: no such folder"]
        root = Path(params.data_dir).expanduser()
        folder = self.folder_path(root)
        # the folder the user must fill, relative to data_dir: the one found, else the GLUE layout's
        where = folder.relative_to(root).as_posix() if folder.is_dir() else f"glue/{self.folder}"
        missing = [f"{where}/{split}.tsv" for split in ("train", "dev") if not (root / where / f"{split}.tsv").exists()]
        if missing:
            problems.append(f"'data_dir' = {params.data_dir!r}: task {self.name} needs {' and '.join(missing)} in it "
                            f"(GLUE TSV layout: train.tsv and dev.tsv in {where}/)")
        return problems

    def _read_tsv(self, path: Path) -> list[tuple]:
        rows = []
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader) if self.has_header else None
            idx = [header.index(c) if isinstance(c, str) else c for c in self.tsv_columns]
            for line in reader:
                if len(line) <= max(idx):
                    continue
                *texts, label = (line[i] for i in idx)
                rows.append((tuple(texts), self._label(label)))
        return rows

    def _label(self, raw):
        if self.num_labels == 1:
            return float(raw)
        if raw in ("entailment", "not_entailment"):
            return 0 if raw == "entailment" else 1  # the hub's RTE/QNLI label ids
        return int(raw)

    def _read_hub(self, split: str) -> tuple[list[tuple], dict]:
        from loralab.models import hub_dataset  # only hub users need it; Unreachable at once when offline

        ds = hub_dataset(HUB_ID, self.hub_name, split=split)
        rows = [(tuple(r[f] for f in self.text_fields), r["label"]) for r in ds]
        return rows, {"dataset": HUB_ID, "config": self.hub_name, "split": split, "fingerprint": ds._fingerprint}

    def read(self, split: str, data_dir) -> tuple[list[tuple], dict]:
        """Rows of (texts, label) for ``train`` or ``dev`` and their provenance."""
        if not data_dir:
            return self._read_hub("train" if split == "train" else "validation")
        path = self.folder_path(data_dir) / f"{split}.tsv"
        return self._read_tsv(path), {"file": str(path), "sha256": sha256_file(path)}

    def tokenize(self, rows, tokenizer, params) -> list[dict]:
        texts = list(zip(*[r[0] for r in rows])) if rows else []
        enc = tokenizer(
            *texts,
            truncation=True,
            max_length=params.max_length,
            padding="max_length" if params.pad_to_max_length else False,
        )
        return [
            {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": rows[i][1]}
            | ({"token_type_ids": enc["token_type_ids"][i]} if "token_type_ids" in enc else {})
            for i in range(len(rows))
        ]

    def load(self, params, tokenizer):
        from loralab.tasks.base import TaskData

        train_rows, train_prov = self.read("train", params.data_dir)
        split = getattr(params, "eval_split", "dev")
        if split == "dev":
            eval_rows, eval_prov = self.read("dev", params.data_dir)
        else:
            train_rows, eval_rows = holdout_split(
                train_rows, getattr(params, "holdout_fraction", 0.1), getattr(params, "holdout_seed", 0)
            )
            eval_prov = {**train_prov, "split": "holdout", "rows": len(eval_rows),
                         "holdout_fraction": getattr(params, "holdout_fraction", 0.1), "holdout_seed": getattr(params, "holdout_seed", 0)}
            train_prov = {**train_prov, "minus_holdout": len(eval_rows)}
        if params.max_train_samples:
            rng = np.random.default_rng(params.seed)
            keep = np.sort(rng.permutation(len(train_rows))[: params.max_train_samples])
            train_rows = [train_rows[i] for i in keep]
        if params.max_eval_samples:
            eval_rows = eval_rows[: params.max_eval_samples]
        return TaskData(
            train=self.tokenize(train_rows, tokenizer, params),
            eval=self.tokenize(eval_rows, tokenizer, params),
            provenance={"train": train_prov, "eval": eval_prov, "headline": self.metrics[0]},
        )

    # ---- evaluation -------------------------------------------------------------------------
    def score(self, predictions, references) -> dict:
        return compute_metrics(self.metrics, np.asarray(predictions), np.asarray(references))

    def evaluate(self, model, tokenizer, data, params, out_dir=None) -> dict:
        return self.score_features(model, tokenizer, data.eval, params)

    def score_features(self, model, tokenizer, features, params) -> dict:
        """The task's metrics of ``model``'s predictions over tokenized ``features`` (their ``labels`` the references):
        the regression output for one label, else the argmax class; and ``loss``, the loss the model's head trains
        with over the same rows (seed 003's validation-loss curve; ``dev_loss``)."""
        outputs = predict(model, tokenizer, features, params)
        preds = outputs[:, 0] if self.num_labels == 1 else outputs.argmax(-1)
        refs = [f["labels"] for f in features]
        return settle({**self.score(preds, refs), "loss": dev_loss(outputs, refs, self.num_labels)})


EVAL_SPLITS = ("dev", "holdout")


def score_dev(task: GlueTask, model, tokenizer, data_dir, max_samples: int | None = None,
              batch_size: int | None = None, max_length: int | None = None) -> dict:
    """``loralab eval``'s GLUE scoring of a sequence-classification ``model`` (a peft adapter loaded on it or not):
    ``task``'s dev split (its first ``max_samples`` rows; None: all; from ``data_dir``'s GLUE TSVs, or the hub's
    validation split where ``data_dir`` is None), tokenized as ``loralab run`` does (truncated to ``max_length``
    tokens, None: ``config``'s default 128; no padding to it), ``batch_size`` rows a forward (None:
    ``eval_batch_size``'s default). A model without ``config.pad_token_id`` gets the tokenizer's, as ``loralab run``
    gives it (decoder bases' classification heads read it to find each row's last token). Returns the task's
    metrics (``compute_metrics``) plus ``headline`` (its first metric), ``rows`` and ``seconds`` (read, predict,
    total). Raises OSError where the dev file is missing."""
    import time

    from loralab.config import build_parameters  # config is the floor below tasks

    start = time.perf_counter()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id(tokenizer)
    params = build_parameters({"task": task.name, **({"eval_batch_size": batch_size} if batch_size else {}),
                               **({"max_length": max_length} if max_length else {})})
    rows, _ = task.read("dev", data_dir)
    rows = rows[:max_samples] if max_samples else rows
    features = task.tokenize(rows, tokenizer, params)
    read = time.perf_counter()
    metrics = task.score_features(model, tokenizer, features, params)
    done = time.perf_counter()
    return {**metrics, "headline": task.metrics[0], "rows": len(rows),
            "seconds": {"read": read - start, "predict": done - read, "total": done - start}}


def check_holdout(params) -> list[str]:
    """Problems of ``eval_split`` / ``holdout_fraction`` / ``holdout_seed`` (read with defaults
    dev / 0.1 / 0 while config.py does not declare them)."""
    problems = []
    split = getattr(params, "eval_split", "dev")
    fraction = getattr(params, "holdout_fraction", 0.1)
    seed = getattr(params, "holdout_seed", 0)
    if split not in EVAL_SPLITS:
        problems.append(f"'eval_split' = {split!r} is not allowed; allowed: {', '.join(EVAL_SPLITS)}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        problems.append(f"'holdout_fraction' = {fraction!r} must be a number in (0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        problems.append(f"'holdout_seed' = {seed!r} must be an integer")
    return problems


def holdout_split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train rows, held-out rows): round(fraction · n) rows drawn by
    ``numpy.random.default_rng(seed).permutation(n)`` (at least one, at most n − 1), both parts in
    file order. Independent of the training seed, so every method and seed sees the same split.
    Raises ValueError for fewer than two rows."""
    n = len(rows)
    if n < 2:
        raise ValueError(f"a held-out split needs at least 2 training rows, got {n}")
    k = min(n - 1, max(1, round(fraction * n)))
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


@torch.no_grad()
def predict(model, tokenizer, features, params) -> np.ndarray:
    """Logits of a classification model over tokenized features, in order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    pad_to = params.max_length if params.pad_to_max_length else None
    for start in range(0, len(features), params.eval_batch_size):
        chunk = [{k: v for k, v in f.items() if k != "labels"} for f in features[start : start + params.eval_batch_size]]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id(tokenizer), pad_to).items()}
        out.append(model(**batch).logits.float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def dev_loss(logits: np.ndarray, refs, num_labels: int) -> float:
    """Mean loss of ``logits`` (N, num_labels) float32 against ``refs`` (N labels), as transformers' sequence
    classification heads compute it in training: mean squared error of the single output for one label (STS-B's
    regression), else cross-entropy of the logits (nats). The seed 003 notebooks log it per epoch as ``val_loss``."""
    out = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    if num_labels == 1:
        return float(torch.nn.functional.mse_loss(out[:, 0], torch.as_tensor(np.asarray(refs), dtype=torch.float32)))
    return float(torch.nn.functional.cross_entropy(out, torch.as_tensor(np.asarray(refs), dtype=torch.long)))


def compute_metrics(names, preds, refs) -> dict:
    """``{metric: number}`` under the one rule for degenerate metrics (``tasks.metrics``): a
    constant prediction's correlation (Pearson, Spearman, MCC) and F1 without a positive
    prediction are 0 and listed under ``"degenerate"``; nothing NaN or infinite is returned."""
    return score_all(names, np.asarray(preds), np.asarray(refs))


_TASKS = [
    GlueTask("glue/cola", "CoLA", "cola", ("sentence",), (3, 1), False, 2, ("matthews_correlation", "accuracy")),
    GlueTask("glue/sst2", "SST-2", "sst2", ("sentence",), ("sentence", "label"), True, 2, ("accuracy",)),
    GlueTask("glue/mrpc", "MRPC", "mrpc", ("sentence1", "sentence2"), ("#1 String", "#2 String", "Quality"), True, 2, ("accuracy", "f1")),
    GlueTask("glue/qnli", "QNLI", "qnli", ("question", "sentence"), ("question", "sentence", "label"), True, 2, ("accuracy",)),
    GlueTask("glue/rte", "RTE", "rte", ("sentence1", "sentence2"), ("sentence1", "sentence2", "label"), True, 2, ("accuracy",)),
    GlueTask("glue/stsb", "STS-B", "stsb", ("sentence1", "sentence2"), ("sentence1", "sentence2", "score"), True, 1, ("pearson", "spearmanr")),
]
TASKS = {t.name: t for t in _TASKS}
