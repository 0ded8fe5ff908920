"""The checks ``decomposition.build`` makes again for a library caller (``build_adapter``, ``run_study``): the
numeric arguments and the calibration set (``argument_problems``), the rank against every layer CorDA targets
on the loaded model (``rank_problems``) and the study's window against its tokenized corpora (``window_problems``). ``loralab decompose`` makes them before any weights load, with the rest
of its checks (``checks``: the model's skeleton, target names, --save-path, --device). Apart from ``checks``
because that imports ``methods.common`` for the target names, and ``methods.common`` reaches ``build`` (through
``merge``): ``build`` importing ``checks`` would close a circle.
"""

from __future__ import annotations

from loralab.decomposition.calibration import source_problem


def _positive(name: str, value) -> list[str]:
    return [] if value is None or value > 0 else [f"'{name}' = {value!r} must be a positive integer"]


def argument_problems(*, mode: str, rs: list[int], calib_dataset: str, calib_size: int, calib_seqlen: int,
                      batch_size: int, data_dir=None, seq_len: int | None = None, max_windows: int | None = None) -> list[str]:
    """Every problem of the arguments that needs no model."""
    problems = []
    if mode == "full-decompose":
        problems += [f"'--r' = {r} must be 0 or more (components discarded per layer)" for r in rs if r < 0]
        problems += _positive("--seq-len", seq_len) + _positive("--max-windows", max_windows)
    elif len(rs) != 1:
        problems.append(f"'--r' takes one rank in mode {mode!r}, got {rs}")
    elif rs[0] < 1:
        problems.append(f"'--r' = {rs[0]}: the adapter rank must be at least 1")
    problems += _positive("--calib-size", calib_size) + _positive("--calib-seqlen", calib_seqlen)
    problems += _positive("--batch-size", batch_size)
    problem = source_problem(calib_dataset, data_dir)
    return problems + ([f"'--calib-dataset': {problem}"] if problem else [])


def rank_problems(model, lora_config) -> list[str]:
    """The adapter rank against every layer CorDA targets: it must not exceed min(in, out). Names the
    first layer too small and how many others are."""
    from loralab.decomposition.attach import _rank, _weight_out_in, corda_targets

    try:
        targets = corda_targets(model, lora_config)
    except ValueError as exc:
        return [f"'--target-modules': {exc}"]
    bad = []
    for name, module in targets.items():
        out_f, in_f = _weight_out_in(module).shape
        r = _rank(lora_config, name)
        if r > min(out_f, in_f):
            bad.append((name, r, in_f, out_f))
    if not bad:
        return []
    name, r, in_f, out_f = bad[0]
    more = f" (and {len(bad) - 1} more of the {len(targets)} targeted layers)" if len(bad) > 1 else ""
    return [f"'--r' = {r} is larger than layer {name} ({in_f}->{out_f}) allows (at most {min(in_f, out_f)}){more}"]


CORPUS_NAMES = {"wikitext2": "WikiText-2 test", "ptb": "PTB validation"}
"""How messages name the study's scored corpora (``tasks.corpora.SOURCES``' keys)."""


def window_problems(counts: dict[str, int], seq_len: int) -> list[str]:
    """``--seq-len`` against each scored corpus's token count (``counts``: corpus name -> tokens with the model's
    tokenizer): a corpus shorter than one window has nothing to score."""
    return [f"'--seq-len' = {seq_len} is longer than corpus {name} ({CORPUS_NAMES.get(name, name)}: {n} tokens with "
            f"this model's tokenizer): no window to score; allowed: at most {n}"
            for name, n in counts.items() if n < seq_len]
