"""The result writer (issue 21): strict JSON, a record that does not validate is not written, and
git provenance measured from the tree, ``unknown`` without ``.git``, given only by named variables."""

import copy
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from loralab import results
from loralab.results import InvalidRecord, git_state, route, validate, write_result

ROOT = Path(__file__).resolve().parents[1]
GIVEN = ("LORALAB_GIT_COMMIT", "LORALAB_GIT_BRANCH", "LORALAB_GIT_DIRTY")


def real_record(folder="glue-minilm-seeds", task="stsb") -> dict:
    """A record as a real run wrote it (MiniLM-L6, STS-B, H200)."""
    path = next(p for p in sorted((ROOT / "results" / folder).glob("*.json")) if f"--{task}--" in p.name)
    return json.loads(path.read_text())


def strict_load(path: Path):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def no_given(monkeypatch):
    for name in GIVEN:
        monkeypatch.delenv(name, raising=False)


def test_every_record_in_results_validates():
    paths = [p for p in (ROOT / "results").rglob("*.json") if "run_info" in (d := json.loads(p.read_text()))
             and isinstance(d, dict)]
    assert len(paths) > 400
    bad = {str(p): validate(json.loads(p.read_text())) for p in paths}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("where, value", [
    (("eval", "pearson"), float("nan")),  # issue 21 input 4: a constant STS-B prediction
    (("eval", "spearmanr"), float("inf")),
    (("train_info", "metrics", 0, "train loss"), float("nan")),
    (("run_info", "total_time"), float("-inf")),
])
def test_non_finite_record_is_not_written(tmp_path, monkeypatch, where, value):
    monkeypatch.setenv("LORALAB_RESULTS_DIR", str(tmp_path))
    record = real_record()
    target = record
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    with pytest.raises(InvalidRecord) as info:
        write_result(record, {"branch": "main", "dirty": False})
    assert "not finite" in str(info.value) and str(where[-1]) in str(info.value)
    assert "\n" not in str(info.value)  # the CLI prints the first line
    assert not list(tmp_path.rglob("*.json*"))


@pytest.mark.parametrize("change, named", [
    (lambda r: r["run_info"].pop("git"), "missing run_info.git"),
    (lambda r: r.pop("meta_info"), "missing section meta_info"),
    (lambda r: r["eval"].update(accuracy="0.9"), "eval.accuracy"),
    (lambda r: r["eval"].update(accuracy=True), "eval.accuracy"),
    (lambda r: r["train_info"].update(trainable_params=1.5), "train_info.trainable_params"),
    (lambda r: r["run_info"].update(created_at=123), "run_info.created_at"),
    (lambda r: r["run_info"]["git"].update(dirty="no"), "run_info.git.dirty"),
    (lambda r: r["train_info"].update(status="done"), "train_info.status"),
])
def test_invalid_record_names_the_problem_and_is_not_written(tmp_path, monkeypatch, change, named):
    monkeypatch.setenv("LORALAB_RESULTS_DIR", str(tmp_path))
    record = real_record()
    change(record)
    with pytest.raises(InvalidRecord, match=named.replace(".", r"\.")):
        write_result(record, {"branch": "main", "dirty": False})
    assert not list(tmp_path.rglob("*.json*"))


def test_valid_record_is_strict_json_with_plain_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_RESULTS_DIR", str(tmp_path))
    record = real_record("svd-family/tuned", "cola")
    record["eval"]["matthews_correlation"] = np.float32(0.25)  # numpy scalars become JSON numbers
    record["train_info"]["adapter_path"] = tmp_path / "adapter"
    path = write_result(copy.deepcopy(record), {"branch": "main", "dirty": True})
    assert path.parent.name == "temporary_results"
    back = strict_load(path)
    assert back["eval"]["matthews_correlation"] == pytest.approx(0.25)
    assert back["train_info"]["adapter_path"] == str(tmp_path / "adapter")
    assert validate(back) == []


@pytest.mark.slow  # ~10 s: the CLI imports torch and reads the experiment
def test_cli_says_why_and_exits_1_when_the_record_does_not_validate(tmp_path, monkeypatch, capsys):
    """The run path: run_experiment's write raises InvalidRecord, `loralab run` names it, exit 1."""
    from loralab import run as run_path
    from loralab.cli import main

    monkeypatch.setenv("LORALAB_RESULTS_DIR", str(tmp_path / "res"))
    record = real_record()
    record["eval"]["pearson"] = float("nan")

    def fake_run(exp, verbose=False, resume=False):
        return record, results.write_result(record, results.git_state(experiment=exp.path))

    monkeypatch.setattr(run_path, "run_experiment", fake_run)
    code = main(["run", str(ROOT / "experiments" / "glue-minilm" / "lora" / "stsb")])
    err = capsys.readouterr().err
    assert code == 1
    assert "InvalidRecord" in err and "eval.pearson = nan" in err
    assert not list(tmp_path.rglob("*.json*"))


def test_tree_without_git_records_unknown(tmp_path, no_given):
    git = git_state(tmp_path)
    assert git["commit"] == git["branch"] == git["dirty"] == "unknown"  # never false
    assert git["source"].startswith("unknown: no git work tree")
    assert len(git["code_sha256"]) == 64
    assert route("success", git).name == "temporary_results"


def test_given_values_are_named_and_only_what_was_given(tmp_path, no_given, monkeypatch):
    monkeypatch.setenv("LORALAB_GIT_COMMIT", "dda3f86")
    git = git_state(tmp_path)
    assert git["commit"] == "dda3f86" and git["dirty"] == "unknown" and git["branch"] == "unknown"
    assert git["source"] == "given by LORALAB_GIT_COMMIT"
    assert route("success", git).name == "temporary_results"
    monkeypatch.setenv("LORALAB_GIT_BRANCH", "main")
    monkeypatch.setenv("LORALAB_GIT_DIRTY", "0")
    git = git_state(tmp_path)
    assert git["dirty"] is False
    assert git["source"] == "given by LORALAB_GIT_COMMIT, LORALAB_GIT_BRANCH, LORALAB_GIT_DIRTY"
    assert route("success", git).name == "results"  # the launcher said so, and the record says it did


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_git_tree_is_measured_and_given_values_ignored(tmp_path, no_given, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "exp").mkdir(parents=True)
    (repo / "exp" / "training_parameters.json").write_text("{}")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "x")
    monkeypatch.setenv("LORALAB_GIT_DIRTY", "0")  # a tree with .git is measured, whatever is given
    git = git_state(repo, experiment=repo / "exp")
    assert git["source"] == "measured" and git["branch"] == "main" and git["dirty"] is False
    assert git["experiment_committed"] is True and len(git["commit"]) == 40
    assert route("success", git).name == "results"
    (repo / "exp" / "training_parameters.json").write_text('{"seed": 1}')
    assert git_state(repo)["dirty"] is True
    outside = git_state(repo, experiment=tmp_path)
    assert outside["experiment_committed"] is False
    _git(repo, "checkout", "-q", "--", ".")
    assert route("success", git_state(repo, experiment=tmp_path)).name == "temporary_results"


def test_untracked_files_in_the_code_or_the_experiment_keep_a_run_off_main(tmp_path, no_given):
    """A new module nobody committed can be imported by the code that ran, and a new file in the experiment folder
    can be one of its inputs: either keeps the run out of results/, and the reason names the file. Ignored files and
    untracked files elsewhere in the tree (a record the quickstart wrote) do not."""
    from loralab.results import not_main_run

    repo = tmp_path / "repo"
    (repo / "code").mkdir(parents=True)
    (repo / "exp").mkdir()
    (repo / "code" / "a.py").write_text("x = 1\n")
    (repo / "exp" / "adapter_config.json").write_text("{}")
    (repo / ".gitignore").write_text("outputs/\n")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "x")
    (repo / "results").mkdir()
    (repo / "results" / "record.json").write_text("{}")  # untracked, outside the code and the experiment
    (repo / "exp" / "outputs").mkdir()
    (repo / "exp" / "outputs" / "adapter.bin").write_text("")  # ignored
    git = git_state(repo / "code", experiment=repo / "exp")
    assert git["dirty"] is False and git["experiment_committed"] is True and "untracked" not in git
    assert route("success", git).name == "results"

    (repo / "code" / "b.py").write_text("y = 2\n")
    git = git_state(repo / "code", experiment=repo / "exp")
    assert git["dirty"] is True and git["untracked"] == ["code/b.py"]
    assert not_main_run(git) == "the code has files git does not track in its folder (code/b.py)"
    assert route("success", git).name == "temporary_results"
    (repo / "code" / "a.py").write_text("x = 3\n")  # both causes at once: both named
    assert not_main_run(git_state(repo / "code")) == ("the code has uncommitted changes, and files git does not "
                                                      "track in its folder (code/b.py)")
    _git(repo, "checkout", "-q", "--", "code/a.py")

    (repo / "code" / "b.py").unlink()
    (repo / "exp" / "training_parameters.json").write_text('{"seed": 1}')
    git = git_state(repo / "code", experiment=repo / "exp")
    assert git["dirty"] is False and git["experiment_committed"] is False
    assert git["experiment_untracked"] == ["exp/training_parameters.json"]
    assert "files git does not track (exp/training_parameters.json)" in not_main_run(git)
    assert route("success", git).name == "temporary_results"

    for i in range(12):
        (repo / "code" / f"m{i:02d}.py").write_text("")
    listed = git_state(repo / "code")["untracked"]
    assert len(listed) == 11 and listed[-1] == "... and 2 more"


def test_code_sha256_measures_the_code(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    first = results.code_sha256(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.py").write_text("cache")
    assert results.code_sha256(tmp_path) == first
    (tmp_path / "a.py").write_text("x = 2\n")
    assert results.code_sha256(tmp_path) != first


@pytest.mark.parametrize("git", [
    {"branch": "main", "dirty": False, "commit": "abc1234", "experiment_committed": True},
    {"branch": "main", "dirty": False, "commit": "abc1234"},
    {"branch": "main", "dirty": False, "commit": "abc1234", "experiment_committed": False},
    {"branch": "main", "dirty": True, "commit": "abc1234"},
    {"branch": "dev", "dirty": False, "commit": "abc1234"},
    {"branch": "unknown", "dirty": "unknown", "commit": "unknown"},
    {"branch": "main", "dirty": "unknown", "commit": "abc1234"},
])
def test_the_opening_lines_reason_is_the_routing_rule(git):
    """The reason the opening line gives and the folder the record goes to come from one rule: a
    reason is named exactly when a successful run does not go to results/."""
    from loralab.results import not_main_run, route, route_reason

    to_results = route("success", git).name == "results"
    assert (not_main_run(git) is None) == to_results
    assert route_reason(git).startswith("main at ") == to_results
