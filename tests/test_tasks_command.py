"""``loralab tasks`` (issue 24.6): each training task with its kind, what it trains on and what it
evaluates by default with the metric, each evaluation and each group, one aligned line each (it
printed bare task names)."""

import re

from loralab.cli import main
from loralab.tasks import TASKS
from loralab.tasks.evaluate import EVALS, GROUPS


def sections(capsys) -> list[list[str]]:
    assert main(["tasks"]) == 0
    return [block.splitlines() for block in capsys.readouterr().out.strip().split("\n\n")]


def test_every_task_evaluation_and_group_has_one_line(capsys):
    tasks, evals, groups = sections(capsys)
    for lines, names in ((tasks, TASKS), (evals, EVALS), (groups, GROUPS)):
        assert [line.split()[0] for line in lines[1:]] == list(names)


def test_columns_are_aligned_under_their_headers(capsys):
    for lines in sections(capsys):
        header = lines[0]
        starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", header)]  # each header column's first letter
        assert len(starts) >= 3
        for line in lines[1:]:
            for s in starts[1:]:
                assert line[s - 2:s] == "  " and line[s] != " ", (header, line)


def test_a_task_line_says_kind_data_and_default_evaluation_with_metric(capsys):
    tasks, evals, groups = sections(capsys)
    row = {line.split()[0]: line for line in tasks[1:]}
    assert row["glue/rte"].split()[1] == "seq_cls" and "RTE train" in row["glue/rte"]
    assert row["glue/rte"].endswith("RTE dev: accuracy")
    assert row["glue/stsb"].endswith("STS-B dev: pearson, spearmanr")
    assert row["gsm8k"].split()[1:3] == ["causal_lm", "openai/gsm8k"] and row["gsm8k"].endswith("gsm8k: accuracy")
    assert row["codefeedback"].endswith("humaneval, mbpp: pass@1")
    assert "group commonsense" in row["commonsense170k"] and row["commonsense170k"].endswith("accuracy")
    assert "nothing by default" in row["alpaca"]
    (commonsense,) = groups[1:]
    assert commonsense.split()[1] == "accuracy" and "boolq" in commonsense and "openbookqa" in commonsense


SPLITS = {"test": "test", "validation": "validation", "valid": "validation", "dev": "validation", "train": "train"}


def splits_named(text: str) -> set[str]:
    """The dataset splits a text names (``ptb.valid.txt``, ``(penn_treebank, validation)``, ``NQ-open dev``)."""
    return {SPLITS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in SPLITS}


def test_ptb_is_listed_as_the_validation_split_it_scores(capsys):
    """``ptb`` scores PTB's validation split (CorDA's: ``tasks.corpora``) but was listed as "PTB test perplexity"."""
    _, evals, _ = sections(capsys)
    row = {line.split()[0]: line for line in evals[1:]}
    assert "PTB validation perplexity" in row["ptb"] and "test" not in row["ptb"]
    assert "WikiText-2 test perplexity" in row["wikitext2"]


def test_no_description_names_a_split_its_source_does_not_read():
    """Every evaluation's line in ``loralab tasks`` against ``Eval.source`` (the file its loader opens and the hub
    split that stands in for it): a split the description names must be the one the source names, where it names one."""
    wrong = {}
    for name, ev in EVALS.items():
        read = splits_named(ev.source.local + " " + ev.source.hub) if ev.source else set()
        if read and not splits_named(ev.description) <= read:
            wrong[name] = (ev.description, sorted(read))
    assert wrong == {}
    assert splits_named(EVALS["ptb"].source.local) == {"validation"}  # the rule sees PTB's file for what it is
