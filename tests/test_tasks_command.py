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
