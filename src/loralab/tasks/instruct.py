"""Instruction fine-tuning (SFT) tasks for causal LMs: MetaMathQA, CodeFeedback, commonsense_170k,
Alpaca, Code Alpaca, WizardLM, GSM8K train, and peft method_comparison's MetaMathQA protocol.

Three tokenisation rules, each as its source wrote it:

- ``masked`` (Stanford Alpaca ``train.py``, copied by MetaMath ``train_math.py``, CorDA
  ``train_model.py`` and seed 000's ``eval/math/train.py``): source = the Alpaca prompt, target =
  ``f"{output}{tokenizer.eos_token}"`` appended with no separator. Source and source+target are
  tokenized separately, each truncated to ``max_length`` (512 in every one of those scripts);
  labels = input_ids with the first ``n`` positions set to -100, ``n`` = the number of non-pad
  tokens of the tokenized source. So the response tokens and the EOS carry the loss; where BPE
  merges the prompt's final ``:`` with the response's first characters (``:-``), the sources
  mask that merged token too, and so do we.
- ``dora`` (NVlabs DoRA / LLM-Adapters ``finetune.py``): the whole indented prompt with the output
  inside, truncated to ``cutoff_len`` (256 in the DoRA scripts), EOS appended when it is not last
  and the text is shorter than the cutoff; ``train_on_inputs=True`` (their default), so labels =
  input_ids. 120 rows are held out as DoRA's validation set (``train_test_split(test_size=120,
  seed=42)``, reproduced index for index with numpy) and are not trained on.
- ``peft_mc`` (peft ``method_comparison/MetaMathQA`` ``data.py``/``run.py``): ``query_template``
  + response with no separator and no masking (labels = input_ids), truncated to 768; rows with
  ``len(f"{query} {response}") > 1300`` characters are dropped. The source appended no EOS but
  trained on the first pad (= EOS) of every sequence shorter than its batch's longest, an
  artefact of bucketed right padding; we append one EOS to every row that fits, the
  batch-independent form of the same rule.

Deviations, all deliberate: an example whose labels are all -100 after truncation (a prompt
longer than ``max_length``) is dropped, because a batch of such rows gives a NaN loss; the count
is recorded in the provenance. GSM8K train (``gsm8k``) is turned into MetaMath's answer style
(calculator annotations ``<<...>>`` removed, ``#### x`` -> ``The answer is: x``), so that a model
trained on it answers in the form the CorDA/MetaMath GSM8K evaluation extracts.

``max_train_samples`` = N is ``train[:N]``: the first N rows in stored order (seeds 000/001 pass
``train[:100000]``). Data come from the hub (lazy ``import datasets``) unless ``data_dir`` is set;
then from the local JSON/JSONL file named per task in ``LOCAL_FILES`` (first existing one).
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from loralab.results import sha256_file
from loralab.tasks.commonsense import COMMONSENSE
from loralab.tasks.instruct_templates import (
    ALPACA_NO_INPUT,
    PEFT_MC_QUERY,
    alpaca_prompt,
    dora_prompt,
)
from loralab.tasks.instruct_tokenize import (  # noqa: F401  (re-exported: the tokenisation rules)
    encode_dora,
    encode_masked,
    encode_peft_mc,
    tokenize_rows,
)

DORA_VAL_SET_SIZE = 120
DORA_SPLIT_SEED = 42
PEFT_MC_MAX_CHARS = 1300
COMMONSENSE_170K_URL = (
    "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/ft-training_set/commonsense_170k.json"
)


# ----------------------------------------------------------------------------- record -> text


def gsm8k_to_metamath(answer: str) -> str:
    """A GSM8K worked answer in MetaMath's style: no ``<<calc>>`` annotations, ``The answer is: x``."""
    body, sep, final = answer.rpartition("####")
    if not sep:
        raise ValueError(f"GSM8K answer has no '####' final line: {answer[-80:]!r}")
    body = re.sub(r"<<[^>]*>>", "", body).rstrip()
    return f"{body}\nThe answer is: {final.strip()}"


def _first_turn(row: dict) -> tuple[str, str]:
    """WizardLM: CorDA's jsonl has ``conversation[0].{human,assistant}``; fxmeng's hub copy is flat."""
    for key in ("conversation", "conversations"):
        if row.get(key):
            turn = row[key][0]
            return turn["human"], turn["assistant"]
    return row["human"], row["assistant"]


def _wizardlm_pair(human: str, assistant: str) -> tuple[str, str]:
    return ALPACA_NO_INPUT.format(instruction=human), assistant


def _alpaca_pair(row):
    return alpaca_prompt(row["instruction"], row.get("input") or ""), row["output"]


PAIRS: dict[str, Callable[[dict], tuple[str, str]]] = {
    "query_response": lambda r: (ALPACA_NO_INPUT.format(instruction=r["query"]), r["response"]),
    "query_answer": lambda r: (ALPACA_NO_INPUT.format(instruction=r["query"]), r["answer"]),
    "wizardlm": lambda r: _wizardlm_pair(*_first_turn(r)),
    "alpaca": _alpaca_pair,
    "gsm8k": lambda r: (ALPACA_NO_INPUT.format(instruction=r["question"]), gsm8k_to_metamath(r["answer"])),
    "peft_mc": lambda r: (PEFT_MC_QUERY.format(query=r["query"]), r["response"]),
    "dora": lambda r: (dora_prompt(r["instruction"], r.get("input") or "", r["output"]), ""),
}


# ----------------------------------------------------------------------------- data


def read_records(path: Path) -> list[dict]:
    """A JSON list or JSON Lines file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records, found {type(data).__name__}")
    return data


def dora_split(n: int, test_size: int = DORA_VAL_SET_SIZE, seed: int = DORA_SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(train, validation) indices of ``datasets.Dataset.train_test_split(test_size, shuffle=True, seed)``."""
    import numpy as np

    permutation = np.random.default_rng(seed).permutation(n)
    return permutation[test_size:].tolist(), permutation[:test_size].tolist()


def _hub_provenance(path: str) -> dict:
    try:
        from huggingface_hub import dataset_info

        info = dataset_info(path)
        return {"revision": info.sha, "created_at": str(info.created_at)}
    except Exception as exc:  # offline or not a hub repository: say why there is no revision
        return {"revision": f"unavailable ({type(exc).__name__})"}


# ----------------------------------------------------------------------------- the task


@dataclass
class InstructTask:
    """One SFT dataset: where its rows come from, how a row becomes text, how text becomes features."""

    name: str
    pair: str
    """Key of ``PAIRS``: row -> (prompt, response)."""
    style: str
    """``masked``, ``dora`` or ``peft_mc`` (see the module docstring)."""
    hub: dict[str, Any]
    """``datasets.load_dataset`` keyword arguments for the train split's source."""
    local_files: tuple[str, ...]
    """Candidate files under ``data_dir``, first existing one wins."""
    default_evals: tuple[str, ...]
    """Evaluations run when ``eval_tasks`` is unset (None). Alpaca and WizardLM have none: their sources
    judged them with MT-Bench, which loralab does not implement."""
    description: str
    holdout: int = 0
    """Rows held out as the source's validation set before slicing (DoRA: 120)."""
    max_chars: int | None = None
    """peft method_comparison: drop rows whose ``f"{query} {response}"`` is longer."""
    kind: str = "causal_lm"
    num_labels: int = 0

    # -- contract ----------------------------------------------------------------------------

    def _hub_name(self) -> str:
        return self.hub.get("data_files") or self.hub["path"]

    def local_file(self, data_dir) -> Path | None:
        for rel in self.local_files:
            if (Path(data_dir) / rel).is_file():
                return Path(data_dir) / rel
        return None

    def eval_names(self, params) -> list[str]:
        """The evaluations to run, groups expanded: ``eval_tasks`` as given (``[]``: none), or
        ``default_evals`` when it is None (unset)."""
        from loralab.tasks.evaluate import expand

        return expand(list(self.default_evals) if params.eval_tasks is None else list(params.eval_tasks))

    def check(self, params) -> list[str]:
        problems = []
        if params.data_dir:
            if self.local_file(params.data_dir) is None:
                hub = self._hub_name()
                problems.append(
                    f"'data_dir' = {params.data_dir!r} holds none of {', '.join(self.local_files)} for task "
                    f"'{self.name}'; put the file there, or leave data_dir null with LORALAB_DATA_DIR unset to "
                    f"download {hub!r} from the hub"
                )
        elif importlib.util.find_spec("datasets") is None:
            problems.append(
                f"task '{self.name}' loads {self._hub_name()!r} from the hub, which needs the 'datasets' package "
                f"(pip install datasets); or set 'data_dir' to a folder holding {self.local_files[0]}"
            )
        problems += _check_evals(self.eval_names(params), params.eval_options)
        return problems

    def rows(self, params) -> tuple[list[dict], dict]:
        """Raw training rows (after holdout, slicing and filtering) and their provenance."""
        n = params.max_train_samples
        slice_at_load = self.holdout == 0
        if params.data_dir:
            path = self.local_file(params.data_dir)
            if path is None:
                raise FileNotFoundError(self.check(params)[0])
            rows = read_records(path)
            provenance = {"source": "local", "path": str(path), "sha256": sha256_file(path), "rows_in_file": len(rows)}
            if slice_at_load and n is not None:
                rows = rows[:n]
        else:
            from loralab.models import hub_dataset

            split = f"train[:{n}]" if slice_at_load and n is not None else "train"
            ds = hub_dataset(**self.hub, split=split, what="training data")
            rows = ds.to_list()
            provenance = {"source": "hub", **self.hub, "split": split}
            if "data_files" not in self.hub:  # a URL has no hub revision
                provenance.update(_hub_provenance(self.hub["path"]))
        if self.holdout and len(rows) > self.holdout:
            train_idx, _ = dora_split(len(rows), self.holdout)
            rows = [rows[i] for i in train_idx]
            provenance["validation_held_out"] = self.holdout
            if n is not None:
                rows = rows[:n]
        if self.max_chars is not None:
            before = len(rows)
            rows = [r for r in rows if len(f"{r['query']} {r['response']}") <= self.max_chars]
            provenance["dropped_over_max_chars"] = before - len(rows)
        return rows, provenance

    def load(self, params, tokenizer):
        from loralab.tasks.base import TaskData

        rows, provenance = self.rows(params)
        features, dropped = tokenize_rows(self.style, PAIRS[self.pair], rows, tokenizer, params.max_length)
        provenance.update(
            task=self.name, style=self.style, max_length=params.max_length, train_examples=len(features),
            dropped_without_target=dropped,
        )
        # Generation evaluations read their own test sets (loralab.tasks.evaluate), so no eval records here.
        # Their effective settings are a function of params: recorded with the data's provenance.
        provenance["evaluations"] = self.evaluation_settings(params)
        names = list(provenance["evaluations"])
        if names:  # the report's column for this run: the first evaluation's headline metric
            provenance["headline"] = f"{names[0]}/{provenance['evaluations'][names[0]]['headline']}"
        return TaskData(train=features, eval=[], provenance=provenance)

    def evaluation_settings(self, params) -> dict[str, dict]:
        """Per evaluation: its headline metric, the effective options and, for a generative one, the
        generation settings (``generation_record``: the source protocol overridden by every non-None
        key of ``params.generation``)."""
        from loralab.tasks import evaluate as evals

        out = {}
        for name in self.eval_names(params):
            options = evals.resolve_options(name, params.eval_options)
            entry: dict[str, Any] = {"headline": evals.EVALS[name].headline, "options": options}
            if evals.EVALS[name].output_type == "generate":
                entry["generation"] = evals.generation_record(evals.generation_settings(name, params.generation, options))
            out[name] = entry
        return out

    def eval_count(self, data, params) -> int:
        """How many problems the final evaluation scores: the problems of each generative
        evaluation (its test set, cut to ``max_eval_samples``), summed; perplexity and lm-eval
        evaluations, which score token windows or the harness's own documents, count 0. For the
        run's opening line (``data.eval`` is empty for SFT tasks: problems load at evaluation)."""
        from loralab.tasks.evaluate import EVALS

        return sum(len(EVALS[n].load(n, params.data_dir, params.max_eval_samples))
                   for n in self.eval_names(params) if EVALS[n].output_type == "generate")

    def evaluate(self, model, tokenizer, data, params, out_dir) -> dict[str, float]:
        """Flat ``<evaluation>/<metric>`` numbers; with ``out_dir``, ``generations.jsonl`` (every
        evaluation's records with their prompts, rewritten after each evaluation) and
        ``evaluations.json`` (each evaluation's full result: numbers, the effective generation
        settings, headline, seconds and any warnings). No evaluation (``eval_tasks: []``): ``{}``."""
        from loralab.tasks.evaluate import numeric, run_eval, write_records  # lazy: every family and its scorers

        metrics: dict = {}  # "<eval>/<metric>" -> number, plus "degenerate": [names] when any
        full: dict[str, dict] = {}
        records: list[dict] = []
        for name in self.eval_names(params):
            # out_dir None: run_eval's own <name>.generations.jsonl would repeat generations.jsonl
            result, recs = run_eval(
                name, model, tokenizer, data_dir=params.data_dir, generation=params.generation,
                options=params.eval_options, max_samples=params.max_eval_samples, out_dir=None,
            )
            full[name] = result
            metrics.update({f"{name}/{k}": v for k, v in numeric(result).items()})
            flagged = [f"{name}/{k}" for k in result.get("degenerate") or []]
            if flagged:  # loralab.tasks.metrics' rule, carried into the run's flat metrics
                metrics["degenerate"] = [*metrics.get("degenerate", []), *flagged]
            records += [{"task": name, **r} if "task" not in r else r for r in recs]
            if out_dir is not None and recs:  # after every evaluation, so an interrupted run keeps them
                write_records(Path(out_dir) / "generations.jsonl", records)
        if out_dir is not None and full:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "evaluations.json").write_text(json.dumps(full, indent=2, default=str) + "\n")
        return metrics


def _check_evals(names: list[str], options: dict) -> list[str]:
    """Unknown evaluation names ("did you mean") and bad eval options, found before any training."""
    from loralab.tasks.evaluate import validate_options

    return [f"'eval_tasks'/'eval_options': {p}" for p in validate_options(names, options)]


TASKS: dict[str, InstructTask] = {
    "metamath": InstructTask(
        name="metamath", pair="query_response", style="masked",
        hub={"path": "meta-math/MetaMathQA"},
        local_files=("metamath/MetaMathQA-395K.json", "metamath/MetaMathQA-395K.jsonl", "metamath/train.jsonl"),
        default_evals=("gsm8k",),
        description="MetaMathQA (query/response), CorDA/MetaMath Alpaca prompt, prompt masked, EOS, 512",
    ),
    "codefeedback": InstructTask(
        name="codefeedback", pair="query_answer", style="masked",
        hub={"path": "m-a-p/CodeFeedback-Filtered-Instruction"},
        local_files=("codefeedback/CodeFeedback-Filtered-Instruction.jsonl", "codefeedback/train.jsonl"),
        default_evals=("humaneval", "mbpp"),
        description="CodeFeedback-Filtered-Instruction (query/answer), same recipe as metamath",
    ),
    "wizardlm": InstructTask(
        name="wizardlm", pair="wizardlm", style="masked",
        hub={"path": "fxmeng/WizardLM_evol_instruct_V2_143k"},
        local_files=("wizardlm/WizardLM_evol_instruct_V2_143k.jsonl", "wizardlm/WizardLM_evol_instruct_V2_143k.json"),
        default_evals=(),
        description="WizardLM evol_instruct V2 143k (first human/assistant turn), same recipe as metamath",
    ),
    "alpaca": InstructTask(
        name="alpaca", pair="alpaca", style="masked",
        hub={"path": "tatsu-lab/alpaca"},
        local_files=("alpaca/alpaca_data.json", "alpaca/alpaca_5000.json"),
        default_evals=(),
        description="Stanford Alpaca (instruction/input/output), Alpaca's two prompts, prompt masked, EOS",
    ),
    "codealpaca": InstructTask(
        name="codealpaca", pair="alpaca", style="masked",
        hub={"path": "sahil2801/CodeAlpaca-20k"},
        local_files=("code-alpaca/code_alpaca_20k.json", "code-alpaca/code_alpaca_2k.json"),
        default_evals=("humaneval", "mbpp"),
        description="Code Alpaca (instruction/input/output), Alpaca's two prompts; local stand-in for CodeFeedback",
    ),
    "gsm8k": InstructTask(
        name="gsm8k", pair="gsm8k", style="masked",
        hub={"path": "openai/gsm8k", "name": "main"},
        local_files=("gsm8k/train.jsonl",),
        default_evals=("gsm8k",),
        description="GSM8K train in MetaMath's answer style, CorDA/MetaMath prompt, prompt masked, EOS",
    ),
    "commonsense170k": InstructTask(
        name="commonsense170k", pair="dora", style="dora",
        hub={"path": "json", "data_files": COMMONSENSE_170K_URL},
        local_files=("llm-adapters/ft-training_set/commonsense_170k.json", "commonsense_170k.json"),
        default_evals=COMMONSENSE, holdout=DORA_VAL_SET_SIZE,
        description="LLM-Adapters commonsense_170k, DoRA's indented template, train_on_inputs, cutoff 256",
    ),
    "metamath_peft": InstructTask(
        name="metamath_peft", pair="peft_mc", style="peft_mc",
        hub={"path": "meta-math/MetaMathQA"},
        local_files=("metamath/MetaMathQA-395K.json", "metamath/MetaMathQA-395K.jsonl", "metamath/train.jsonl"),
        default_evals=("gsm8k",), max_chars=PEFT_MC_MAX_CHARS,
        description="peft method_comparison MetaMathQA: 'Question: ... Think step by step.' prompt, no masking, 768",
    ),
}
