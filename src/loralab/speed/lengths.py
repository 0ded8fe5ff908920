"""Real token-length distributions for the bench, stored as histograms in ``lengths.json``.

The GPU machine has no ``../shared/data``, so the histograms travel with the package.
``gsm8k_sft``: GSM8K train as SFT text (SmolLM2 tokenizer, a stand-in for Llama-3's);
``sst2``: SST-2 train sentences (MiniLM's WordPiece tokenizer, a stand-in for roberta-base's).
Rebuild with ``build_histograms(data_dir)`` (needs the packaged models' tokenizers).
"""

from __future__ import annotations

import collections
import csv
import json
import random
from pathlib import Path

HISTOGRAMS = Path(__file__).with_name("lengths.json")


def histogram(name: str) -> dict[int, int]:
    data = json.loads(HISTOGRAMS.read_text())
    if name not in data or name.startswith("_"):
        known = ", ".join(k for k in data if not k.startswith("_"))
        raise ValueError(f"length distribution {name!r} is unknown; known: {known}")
    return {int(k): v for k, v in data[name].items()}


def sample_lengths(name: str, n: int, seed: int = 0, max_len: int | None = None) -> list[int]:
    """``n`` lengths drawn from the named histogram (with replacement), capped at ``max_len``."""
    hist = histogram(name)
    rng = random.Random(seed)
    drawn = rng.choices(list(hist), weights=list(hist.values()), k=n)
    return [min(x, max_len) if max_len else x for x in drawn]


def build_histograms(data_dir: str | Path) -> dict:
    """Recompute ``lengths.json``'s histograms from the real files."""
    from transformers import AutoTokenizer

    from loralab.models import resolve_model_path

    data_dir = Path(data_dir)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("packaged:smollm2-135m"))
    rows = [json.loads(line) for line in open(data_dir / "gsm8k" / "train.jsonl")]
    texts = [f"Question: {r['question']} Think step by step.\nAnswer: {r['answer']}" for r in rows]
    gsm = [len(ids) + 1 for ids in tok(texts)["input_ids"]]  # + EOS
    bert = AutoTokenizer.from_pretrained(resolve_model_path("packaged:minilm-l6"))
    with open(data_dir / "glue" / "SST-2" / "train.tsv") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        sst = [len(ids) for ids in bert([row[0] for row in reader])["input_ids"]]

    def hist(values):
        counts = collections.Counter(values)
        return {str(k): counts[k] for k in sorted(counts)}

    return {"gsm8k_sft": hist(gsm), "sst2": hist(sst)}
