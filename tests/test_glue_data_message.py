"""The message for missing GLUE data (issue 24.6) names one path, the one to create, relative to
``data_dir`` (it named ``SST-2/`` while its hint said ``glue/SST-2/``); creating what it names is
enough."""

import re
from types import SimpleNamespace

import pytest

from loralab.tasks.glue import TASKS


def params(data_dir):
    return SimpleNamespace(data_dir=str(data_dir), eval_split="dev", holdout_fraction=0.1, holdout_seed=0)


def named_paths(message: str) -> set[str]:
    return set(re.findall(r"[\w./-]+\.tsv", message))


@pytest.mark.parametrize("layout", ["empty", "glue", "flat"])
def test_missing_glue_data_names_the_path_to_create_and_creating_it_is_enough(tmp_path, layout):
    task = TASKS["glue/sst2"]
    if layout == "glue":
        (tmp_path / "glue" / "SST-2").mkdir(parents=True)
        (tmp_path / "glue" / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine\t1\n")
    elif layout == "flat":  # the other layout loralab reads: <data_dir>/SST-2/
        (tmp_path / "SST-2").mkdir()
    (problem,) = task.check(params(tmp_path))
    assert str(tmp_path) not in problem.split(": ", 1)[1]  # the paths are relative to data_dir, all of them
    folder = "SST-2" if layout == "flat" else "glue/SST-2"
    wanted = {f"{folder}/dev.tsv"} | ({f"{folder}/train.tsv"} if layout != "glue" else set())
    assert named_paths(problem.split("(", 1)[0]) == wanted
    mentions = re.findall(r"[\w./-]*SST-2[\w./-]*", problem.split(": ", 1)[1])
    assert len(mentions) >= 2 and all(m.startswith(f"{folder}/") for m in mentions)  # the hint names the same folder
    for rel in wanted:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("sentence\tlabel\nfine\t1\n")
    assert task.check(params(tmp_path)) == []
