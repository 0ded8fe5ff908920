"""Whether a calibration set is text an evaluation scores: CorDA's covariances taken on the
evaluation's own data make that evaluation look better than it is (a researcher's full-decompose
run on SmolLM2-135M, CorDA r=32: WikiText-2 perplexity 43.9 calibrated on 8 windows of WikiText-2
test, where results/corda has 53.5 calibrated on 32 alpaca rows).

The official code samples every calibration set from a train split (``calibration._HUB``); the local
copies of NQ-open (dev) and WikiText-2 (test) are the files the ``nq_open`` evaluation and the
``wikitext2`` perplexity score. ``EVAL_FILES`` lists, per evaluation, the files under ``data_dir``
whose text it scores (its loader in ``tasks/``; files holding the same questions in another format
count too); ``evaluation_overlap`` matches a calibration provenance against them. A hub split
(always train) overlaps nothing. ``overlap_provenance`` records the match in the provenance and warns:
``loralab decompose`` (kpa/ipa) matches its calibration against every evaluation here (the adapter is
trained and scored later, on any of them), the full-decompose study against the corpora it scores, and a
run against its own evaluations.
"""

from __future__ import annotations

import sys
from pathlib import Path

from loralab.tasks.registry import EVALS

_ALSO = {  # files holding the same questions in another format, after the one the loader reads
    "gsm8k": ("metamath/GSM8K_test.jsonl", "metamath/GSM8K_Backward.jsonl", "llm-adapters/dataset/gsm8k/test.json"),
    "math": ("math/MATH-500/test.jsonl",), "math500": ("math/MATH/test.jsonl",),  # MATH-500 is a subset of MATH test
    "mbpp": ("mbpp/sanitized-mbpp.json",), "mbpp_sanitized": ("mbpp/mbpp.jsonl",),
}
EVAL_FILES: dict[str, tuple[str, ...]] = {
    name: (ev.source.local, *_ALSO.get(name, ())) for name, ev in EVALS.items() if ev.source is not None}
EVAL_FILES["nq_open_lm_eval"] = EVAL_FILES["nq_open"]  # lm-eval's nq_open (hub validation) asks the same questions
"""Evaluation name -> files (relative to ``data_dir``) holding the text it scores: first the file its loader reads
(its record's ``Eval.source``, declared in its family file), then ``_ALSO``."""


def eval_file(name: str, data_dir) -> str | None:
    """The local file the evaluation ``name`` reads first, if ``data_dir`` holds it."""
    for rel in EVAL_FILES.get(name, ())[:1]:
        if data_dir is not None and (Path(data_dir) / rel).is_file():
            return str((Path(data_dir) / rel).resolve())
    return None


def evaluation_overlap(provenance: dict, evaluations, data_dir=None) -> list[str]:
    """The evaluations among ``evaluations`` whose scored text the calibration set (its
    ``provenance["source"]``) was drawn from: the same file under ``data_dir``, or a file of the
    same relative path (``<set>/<file>``) in another data folder."""
    source = str(provenance.get("source") or "")
    if not source or source.startswith("hub:"):
        return []
    path = Path(source).resolve()
    hits = []
    for name in evaluations:
        for rel in EVAL_FILES.get(name, ()):
            same = data_dir is not None and (Path(data_dir) / rel).resolve() == path
            if same or path.as_posix().endswith("/" + rel):
                hits.append(name)
                break
    return hits


def overlap_note(provenance: dict, overlap: list[str]) -> str:
    """One sentence for logs, records and captions."""
    return (f"the calibration text ({provenance.get('source')}) is what {', '.join(overlap)} score(s): "
            "calibrating on the evaluation data inflates those scores")


def warn_overlap(provenance: dict, overlap: list[str], where: str) -> None:
    """Print the warning to stderr (one process of a distributed launch: the main one)."""
    from loralab import distributed

    if overlap and distributed.is_main():
        print(f"warning: {where}: {overlap_note(provenance, overlap)}", file=sys.stderr, flush=True)


def overlap_provenance(provenance: dict, evaluations, data_dir, where: str) -> dict:
    """``provenance`` (a calibration set's, ``calibration.calibration_samples``) with ``overlaps_evaluations``: the
    evaluations among ``evaluations`` that score its text ([] for none; ``evaluation_overlap``), and where there
    are any ``overlap_note``, the warning printed too (``warn_overlap``, naming ``where`` and the file): the fields
    a run records for its calibration (``methods.context``). A new dict; JSON-ready where ``provenance`` is."""
    overlap = evaluation_overlap(provenance, evaluations, data_dir)
    out = {**provenance, "overlaps_evaluations": overlap}
    if overlap:
        out["overlap_note"] = overlap_note(provenance, overlap)
        warn_overlap(provenance, overlap, where)
    return out
