"""Two tables name the local file each evaluation reads: ``tasks.data_check.SOURCES`` (found before the model
loads) and ``decomposition.overlap.EVAL_FILES`` (calibration on an evaluation's own text warns). They live on
separate floors; this keeps them naming the same file first, so neither drifts from the other."""

from loralab.decomposition.overlap import EVAL_FILES
from loralab.tasks.data_check import SOURCES


def test_the_two_tables_name_the_same_file_first():
    shared = sorted(set(EVAL_FILES) & set(SOURCES))
    assert len(shared) >= 15  # the generative evaluations, perplexity and the commonsense sets
    assert {name: EVAL_FILES[name][0] for name in shared} == {name: SOURCES[name][0] for name in shared}
