"""Each evaluation declares where its data lives once, on its ``Eval`` record (``source``, in its family file),
and its loader opens that declared path. ``tasks.data_check.SOURCES`` (found before the model loads) and
``decomposition.overlap.EVAL_FILES`` (calibration on an evaluation's own text warns) derive from the records;
these tests keep them and the loaders naming the same file."""

import pytest

from loralab import models
from loralab.decomposition.overlap import EVAL_FILES
from loralab.tasks.corpora import load_corpus
from loralab.tasks.data_check import SOURCES
from loralab.tasks.registry import EVALS

WITH_SOURCE = sorted(n for n, ev in EVALS.items() if ev.source is not None)
HUB_FALLBACK = {"hellaswag", "wikitext2", "ptb"}  # a data folder without the file: the hub stands in


def _load(name, data_dir):
    """What the evaluation's loader returns for ``data_dir`` (two problems, or the corpus text)."""
    ev = EVALS[name]
    return ev.load(name, data_dir, 2) if ev.output_type == "generate" else load_corpus(name, data_dir)


@pytest.fixture
def hub_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a hub that refuses at once


def test_the_two_tables_name_the_same_file_first():
    shared = sorted(set(EVAL_FILES) & set(SOURCES))
    assert len(shared) >= 15  # the generative evaluations, perplexity and the commonsense sets
    assert {name: EVAL_FILES[name][0] for name in shared} == {name: SOURCES[name][0] for name in shared}


def test_every_evaluation_with_data_declares_its_source():
    for name, ev in EVALS.items():
        if ev.output_type in ("generate", "perplexity"):  # lm_eval bridges fetch their own data
            assert ev.source is not None, name
            assert ev.source.local and not ev.source.local.startswith("/") and ev.source.hub, name
        else:
            assert ev.source is None, name
    assert SOURCES == {n: (EVALS[n].source.local, EVALS[n].source.hub) for n in WITH_SOURCE}
    assert set(EVAL_FILES) == {*SOURCES, "nq_open_lm_eval"}


@pytest.mark.parametrize("name", WITH_SOURCE)
def test_an_empty_data_folder_fails_on_exactly_the_declared_file(name, tmp_path, hub_unreachable):
    declared = EVALS[name].source.path(tmp_path)
    assert declared == tmp_path / SOURCES[name][0]
    with pytest.raises((FileNotFoundError, models.Unreachable)) as caught:
        _load(name, tmp_path)
    if name in HUB_FALLBACK:
        assert isinstance(caught.value, models.Unreachable)
    else:
        assert isinstance(caught.value, FileNotFoundError)
        assert caught.value.filename == str(declared)
        assert str(declared) in str(caught.value)


@pytest.mark.parametrize("name", WITH_SOURCE)
def test_the_declared_file_alone_is_what_the_loader_reads(name, tmp_path, data_dir, hub_unreachable):
    declared = EVALS[name].source.path(tmp_path)
    declared.parent.mkdir(parents=True)
    if (data_dir / SOURCES[name][0]).exists():
        declared.symlink_to(data_dir / SOURCES[name][0])
        assert _load(name, tmp_path) == _load(name, data_dir)
    else:  # hellaswag: not in the shared data; one row in LLM-Adapters' format
        declared.write_text('[{"instruction": "Please choose the correct ending ...", "answer": "ending2"}]')
        assert [p["answer"] for p in _load(name, tmp_path)] == ["ending2"]
