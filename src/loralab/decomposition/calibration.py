"""Calibration sets for CorDA/ASVD, as the official code builds them (``cordalib/datautils.py``).

Corpora (wikitext2, ptb, c4) and question sets (nqopen, triviaqa, accepted as the seed's
``traivia_qa``): the texts are joined by "\\n\\n"; each sample starts at a random character
(``random.seed(seed)``, ``randint(0, len - seqlen - 1)``), takes ``seqlen * 10`` characters and
keeps the first ``seqlen`` tokens. Instruction sets (MetaMATH, codefeedback, WizLMinstruct,
alpaca, or a local .json/.jsonl file): ``random.sample(rows, n)`` (rows with a non-empty
``input`` skipped, as the official code does), each row one sample in the Llama-2 chat format of
the official code (``fmt="llama2-chat"``) or in the MetaMath training prompt (``fmt="training"``).
``sampling="first"`` takes the first n instead (seed (a)'s choice). Seed 233 is the official one.

Local copies in ``data_dir`` are used where they exist (``_LOCAL``: the first existing candidate),
otherwise the hub (``datasets``, imported lazily), which serves the split the official code
samples (``_HUB``: train, for every set). Locally only other splits exist of three sets: NQ-open
dev (the ``nq_open`` evaluation's questions), WikiText-2 test (the text the ``wikitext2``
perplexity scores) and PTB valid. The provenance names the file and its ``split`` beside the
official one, and says so in a ``note`` where they differ; ``overlap.evaluation_overlap`` tells
whether the calibration text is what an evaluation scores. MetaMathQA, CodeFeedback and WizardLM
are looked for under the names the training tasks use (``tasks/instruct.py``); with ``data_dir``
set and the hub unreachable, a missing file is a ``ConfigError`` naming the files looked for.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from loralab.config import ConfigError

LLAMA2_CHAT = (
    '<s>[INST] <<SYS>>\n"Below is an instruction that describes a task. Write a response that appropriately '
    'completes the request."\n<</SYS>>\n\n{instruction} [/INST] {response} </s>\n'
)
TRAINING_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:{response}"
)
CORPORA = ("wikitext2", "ptb", "c4", "nqopen", "triviaqa")
INSTRUCTION_SETS = ("MetaMATH", "codefeedback", "WizLMinstruct", "alpaca")
ALIASES = {"traivia_qa": "triviaqa", "trivia_qa": "triviaqa", "nq_open": "nqopen", "metamath": "MetaMATH"}
NAMES = CORPORA + INSTRUCTION_SETS

# name -> candidate local files under data_dir, each with its split (the first existing one wins)
_LOCAL = {
    "nqopen": (("nq_open/NQ-open.dev.jsonl", "dev"),),
    # the 5,000-row subset first, as before (results/corda calibrated on it); the full file where only it is there
    "alpaca": (("alpaca/alpaca_5000.json", "train (a random 5,000-row subset)"), ("alpaca/alpaca_data.json", "train")),
    "wikitext2": (("wikitext-2/wiki.test.raw", "test"),),
    # the train split the official code reads is not local; the test file, because ``ptb`` evaluations score valid
    "ptb": (("ptb/ptb.test.txt", "test"),),
    "MetaMATH": (("metamath/MetaMathQA-395K.json", "train"), ("metamath/MetaMathQA-395K.jsonl", "train"),
                 ("metamath/train.jsonl", "train")),
    "codefeedback": (("codefeedback/CodeFeedback-Filtered-Instruction.jsonl", "train"), ("codefeedback/train.jsonl", "train")),
    "WizLMinstruct": (("wizardlm/WizardLM_evol_instruct_V2_143k.jsonl", "train"),
                      ("wizardlm/WizardLM_evol_instruct_V2_143k.json", "train")),
}
# name -> hub (path, config, split, field): the official code's source (field None: instruction rows)
_HUB = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "sentence"),
    "c4": ("allenai/c4", "en", "train", "text"),
    "nqopen": ("nq_open", None, "train", "question"),
    "triviaqa": ("trivia_qa", "rc", "train", "question"),
    "MetaMATH": ("meta-math/MetaMathQA", None, "train", None),
    "codefeedback": ("m-a-p/CodeFeedback-Filtered-Instruction", None, "train", None),
    "WizLMinstruct": ("fxmeng/WizardLM_evol_instruct_V2_143k", None, "train", None),
    "alpaca": ("tatsu-lab/alpaca", None, "train", None),
}


def canonical_name(name: str) -> str:
    """The calibration set's canonical name; local paths pass through; unknown names rejected."""
    name = ALIASES.get(name, ALIASES.get(name.lower(), name))
    if name in NAMES or Path(name).exists():
        return name
    import difflib

    close = difflib.get_close_matches(name, NAMES + tuple(ALIASES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"calibration dataset {name!r} is unknown{hint}; known: {', '.join(NAMES)}, or a local file")


def _read_rows(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        return json.loads(text)
    return [line for line in text.splitlines() if line.strip()]


def _pair(row: dict) -> tuple[str, str] | None:
    """(instruction, response) of an instruction row; None for rows the official code skips."""
    if "conversation" in row:  # WizardLM
        return row["conversation"][0]["human"], row["conversation"][0]["assistant"]
    if row.get("input"):  # alpaca rows with an input are skipped by the official code
        return None
    for q, a in (("query", "response"), ("query", "answer"), ("instruction", "output"), ("question", "answer")):
        if q in row and a in row:
            answer = row[a] if isinstance(row[a], str) else str(row[a][0] if isinstance(row[a], list) else row[a])
            return row[q], answer
    raise ValueError(f"instruction row has none of the known field pairs: {sorted(row)}")


def local_file(name: str, data_dir) -> tuple[Path, str] | None:
    """The first existing local copy of the named set under ``data_dir`` and its split, or None."""
    for rel, split in _LOCAL.get(name, ()) if data_dir is not None else ():
        if (Path(data_dir) / rel).is_file():
            return Path(data_dir) / rel, split
    return None


def _missing(name: str, data_dir, reason: str) -> ConfigError:
    folder = Path(data_dir)
    looked = ", ".join(str(folder / rel) for rel, _ in _LOCAL[name])
    sub = folder / Path(_LOCAL[name][0][0]).parent
    held = sorted(p.name for p in sub.iterdir()) if sub.is_dir() else []
    held = f"; {sub} holds only {', '.join(held)}" if held else ""
    hub, _, split, _ = _HUB[name]
    return ConfigError([f"calibration dataset {name!r}: no local copy in data_dir {str(folder)!r} (looked for {looked}"
                        f"{held}), and the hub ({hub!r}, {split} split) cannot be used: {reason}. Put the file there "
                        f"(the official code reads {_LOCAL[name][0][0].split('/')[-1]}), or pass another "
                        "--calib-dataset (a named set with a local copy, or a .json/.jsonl file)"],
                       f"calibration dataset {name!r}")


def source_problem(name: str, data_dir=None) -> str | None:
    """Why the calibration set cannot be read here, found without reading it (an unknown name, a
    set with no local copy while the hub is unreachable), or None."""
    try:
        name = canonical_name(name)
    except ValueError as exc:
        return str(exc)
    if Path(name).exists() or local_file(name, data_dir) is not None:
        return None
    from loralab import models

    reason = models.hub_offline_reason()
    if reason is None or reason.startswith("HF_HUB_OFFLINE"):  # reachable, or maybe in the local cache
        return None
    if data_dir is not None and name in _LOCAL:
        return _missing(name, data_dir, reason).problems[0]
    hub, config, split, _ = _HUB[name]
    where = f"data_dir {str(data_dir)!r} holds no local copy of it" if data_dir is not None else "no data_dir is set"
    return f"calibration dataset {name!r} comes from the hub ({hub!r}, {split} split), which cannot be used: {reason}; {where}"


def source_of(name: str, data_dir=None) -> str:
    """The ``source`` ``load_source`` will record for the set, found without reading it."""
    name = canonical_name(name)
    if Path(name).exists():
        return str(Path(name).resolve())
    found = local_file(name, data_dir)
    if found is not None:
        return str(found[0].resolve())
    hub, config, split, _ = _HUB[name]
    return f"hub:{hub}/{config}/{split}"


def load_source(name: str, data_dir=None) -> tuple[list, dict]:
    """Raw rows (strings for corpora, dicts for instruction sets) and their provenance: ``source``
    (the file, or ``hub:path/config/split``), ``split`` and, for a named set, ``official_split``
    (the one the official code samples) with a ``note`` where a local file has another split."""
    path = Path(name)
    if path.exists():
        return _read_rows(path), {"source": str(path.resolve())}
    from loralab.models import Unreachable, hub_dataset  # Unreachable: exit 2, naming the local alternatives

    hub, config, split, field = _HUB[name]
    found = local_file(name, data_dir)
    if found is not None:
        local, local_split = found
        rows = _read_rows(local)
        if name == "nqopen":
            rows = [r["question"] for r in rows]
        provenance = {"source": str(local.resolve()), "split": local_split, "official_split": split}
        if not local_split.startswith(split):
            provenance["note"] = (f"local substitute: the {local_split} split, not the {split} split the official "
                                  f"code samples (not local)")
        return rows, provenance
    try:
        ds = hub_dataset(hub, config, split=split, what="calibration dataset")
    except Unreachable as exc:
        if data_dir is not None and name in _LOCAL:
            from loralab import models

            raise _missing(name, data_dir, models.hub_offline_reason() or "it is not in the Hugging Face cache") from exc
        raise
    rows = list(ds[field]) if field else [dict(r) for r in ds]
    return rows, {"source": f"hub:{hub}/{config}/{split}", "split": split, "official_split": split}


def is_corpus(name: str, rows: list) -> bool:
    return name in CORPORA or (bool(rows) and isinstance(rows[0], str))


def calibration_samples(
    name: str, tokenizer, num_samples: int = 256, *, seed: int = 233, seqlen: int = 2048, data_dir=None,
    fmt: str = "llama2-chat", sampling: str = "random",
) -> tuple[list[torch.Tensor], dict]:
    """Token-id tensors (1-D, no padding), one per calibration sample, and their provenance (``load_source``'s,
    with the arguments and ``kind``: ``corpus`` for joined text, where ``fmt`` plays no part, or ``instructions``)."""
    if fmt not in ("llama2-chat", "training"):
        raise ValueError(f"calibration format {fmt!r}; allowed: 'llama2-chat', 'training'")
    if sampling not in ("random", "first"):
        raise ValueError(f"calibration sampling {sampling!r}; allowed: 'random', 'first'")
    name = canonical_name(name)
    rows, provenance = load_source(name, data_dir)
    rng = random.Random(seed)
    samples = []
    corpus = is_corpus(name, rows)
    if corpus:
        text = "\n\n".join(rows)
        for i in range(num_samples):
            start = i * seqlen * 10 % max(1, len(text) - seqlen) if sampling == "first" else rng.randint(0, len(text) - seqlen - 1)
            ids = tokenizer(text[start : start + seqlen * 10], return_tensors="pt").input_ids[0][:seqlen]
            samples.append(ids)
    else:
        pairs = [p for p in map(_pair, rows) if p is not None]
        if len(pairs) < num_samples:
            raise ValueError(f"calibration set {name!r} has {len(pairs)} usable rows, fewer than {num_samples}")
        chosen = pairs[:num_samples] if sampling == "first" else rng.sample(pairs, num_samples)
        template = LLAMA2_CHAT if fmt == "llama2-chat" else TRAINING_PROMPT
        for instruction, response in chosen:
            if fmt == "training":  # the training target ends with EOS
                response = response + (tokenizer.eos_token or "")
            text = template.format(instruction=instruction, response=response)
            samples.append(tokenizer(text, return_tensors="pt").input_ids[0][:seqlen])
    provenance.update(name=name, kind="corpus" if corpus else "instructions", num_samples=num_samples, seed=seed,
                      seqlen=seqlen, fmt=fmt, sampling=sampling)  # fmt shapes instruction rows only (kind)
    return samples, provenance


def make_batches(samples: list[torch.Tensor], batch_size: int, pad_id: int, padding_side: str = "right") -> list[dict]:
    """Pad 1-D token tensors into batches of ``input_ids`` and ``attention_mask`` (0 on pads).
    Samples are sorted by length first so that batches waste little on padding."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start : start + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, s in enumerate(chunk):
            sl = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
            ids[row, sl] = s
            mask[row, sl] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches
