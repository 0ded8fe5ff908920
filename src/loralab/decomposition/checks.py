"""``loralab decompose``'s checks of the model and the output, made before any weights load (and so before any
calibration, which costs minutes on a large model): the model id and its config, the ``--target-modules``
names (each must match a module: peft skips a typo in silence where another name matches) and the rank
against every targeted layer (peft's ``corda_init`` would fail after the calibration with "Matrix U size
mismatch"), the last two on the model's meta-device skeleton; ``--calib-seqlen`` against the positions the
model was trained on (its config) and, for the study, the ``--r`` list against every linear layer (skeleton) and
``--seq-len`` against the scored corpora (the tokenizer, no weights); ``--save-path`` and ``--device``. The numeric
arguments and the calibration set are ``arguments.argument_problems``. Each returns every problem it finds;
the caller raises one ``ConfigError`` (exit 2) naming them all. ``build.build_adapter`` and ``build.run_study``
call ``model_problems`` too, before they load the weights.
"""

from __future__ import annotations

from loralab.decomposition.arguments import rank_problems, window_problems


def model_problems(model_id: str, *, rank: int | None = None, target_modules=(), calib_seqlen: int | None = None,
                   study_rs=()) -> list[str]:
    """What the model's config alone shows, no weight read: an id naming no model (``models.check_model_id``),
    a config that cannot be read or built into a causal LM (``models.Unreachable``'s line for a hub id offline
    and not cached), ``calib_seqlen`` (tokens) above the config's ``max_position_embeddings``
    (``position_problems``), every ``r`` of ``study_rs`` (full-decompose) that discards every component of every
    linear layer (``study_rank_lines``), and with ``rank`` (kpa/ipa) every name of ``target_modules`` that matches
    no module, with the closest name (``methods.common.unmatched_names``, the check ``loralab run`` makes: peft
    adapts the names that match and skips a typo in silence where another name matches), then
    ``arguments.rank_problems``. All on the model's skeleton (``skeleton.build_skeleton``: built from its config on
    the meta device, as ``loralab run``'s checks are; module names and weight shapes, no memory). One line per
    problem, flags named as ``--model``, ``--target-modules``, ``--r``, ``--calib-seqlen``. Never raises."""
    from peft import LoraConfig

    from loralab import models
    from loralab.methods.common import unmatched_names

    problems = [p.replace("'model_id'", "'--model'", 1) for p in models.check_model_id(model_id)]
    if problems:
        return problems
    skeleton, problems = _skeleton(model_id)
    if skeleton is None:
        return problems
    problems = position_problems(skeleton.config, calib_seqlen) + study_rank_lines(skeleton, study_rs)[0]
    if rank is None:
        return problems
    unmatched = unmatched_names(skeleton, target_modules, "'--target-modules'")
    if target_modules and len(unmatched) == len(set(target_modules)):  # none matches: no layer to rank
        return problems + unmatched
    return problems + unmatched + rank_problems(skeleton, LoraConfig(r=rank, target_modules=list(target_modules)))


def position_problems(config, calib_seqlen: int | None) -> list[str]:
    """``--calib-seqlen`` above the model's ``max_position_embeddings`` (``config``, a transformers config) is an
    error, not a warning: a text calibration set's samples are all ``calib_seqlen`` tokens long (an instruction
    set's longest rows are cut there), so their last positions lie beyond the range the model was trained on,
    where a learned position table has no row (an index error mid-calibration) and rotary positions give
    activations the model never produces in use, which the covariances would then describe. The official CorDA
    code calibrates Llama-2 (4096 positions) on 2048 tokens. No limit in the config: nothing to check."""
    limit = getattr(config, "max_position_embeddings", None)
    if calib_seqlen is None or not isinstance(limit, int) or calib_seqlen <= limit:
        return []
    return [f"'--calib-seqlen' = {calib_seqlen} is longer than the model's max_position_embeddings ({limit}, from its "
            f"config): calibration samples would reach positions it was not trained on; allowed: at most {limit} "
            "(the official CorDA code uses 2048 for Llama-2, whose limit is 4096)"]


def _sizes(shapes: list[tuple[int, int]]) -> str:
    """(out, in) weight shapes -> 'in->out xN' per distinct size, largest min(in, out) first."""
    counts = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    order = sorted(counts, key=lambda s: (-min(s), s))
    return ", ".join(f"{i}->{o} x{counts[(o, i)]}" for o, i in order)


def study_rank_lines(skeleton, rs) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the full-decompose ``--r`` list against the layers the study decomposes (every
    ``nn.Linear`` of ``skeleton``, the output layer included: ``study.linear_layers``), where r >= min(in, out)
    keeps none of a layer's components (``study.truncated``: a zero weight). An r that empties every layer is
    a problem (its row scores an all-zero model); one that empties some layers, a warning naming them."""
    from loralab.decomposition.study import linear_layers

    shapes = {name: tuple(module.weight.shape) for name, module in linear_layers(skeleton).items()}
    problems, warnings = [], []
    for r in sorted(set(rs)):
        emptied = [name for name, shape in shapes.items() if r >= min(shape)]
        if not emptied:
            continue
        if len(emptied) == len(shapes):
            largest = max(min(shape) for shape in shapes.values())
            problems.append(f"'--r' = {r} discards every component of all {len(shapes)} linear layers (sizes in->out: "
                            f"{_sizes(list(shapes.values()))}; at most min(in, out) = {largest}): that row would score "
                            f"an all-zero model; allowed: r below {largest}")
        else:
            warnings.append(f"'--r' = {r} discards every component of {len(emptied)} of the {len(shapes)} linear "
                            f"layers (sizes in->out: {_sizes([shapes[n] for n in emptied])}; {emptied[0]} first): their "
                            f"outputs are zero in that row; r below {min(min(s) for s in shapes.values())} keeps "
                            "every layer")
    return problems, warnings


def study_warnings(model_id: str, rs) -> list[str]:
    """The warnings of ``study_rank_lines`` for ``model_id`` (none where it has no skeleton)."""
    from loralab.skeleton import build_skeleton

    skeleton = build_skeleton(model_id, "causal_lm")
    return [] if skeleton is None else study_rank_lines(skeleton, rs)[1]


def corpus_problems(model_id: str, seq_len: int, corpora, data_dir) -> list[str]:
    """``--seq-len`` (tokens) longer than a scored corpus (``tasks.corpora.load_corpus``: WikiText-2 test, PTB
    validation), which then has no window: the corpus and its token count with the model's tokenizer (loaded
    alone, no weights; ``models.load_tokenizer``'s problems for one that cannot load). The exact count tokenizes
    the corpus (about 1 s for WikiText-2's 1.3 M characters on this CPU), so it is taken only where the length
    cannot settle it: a corpus of at least ``CHARS_PER_TOKEN`` characters per requested token is long enough
    (language-model tokenizers average 3 to 5 characters per token on English prose; 32 is never reached), which
    passes the usual windows (WikiText-2: up to 40,000 tokens, PTB: 12,000) without tokenizing."""
    from loralab.config import ConfigError
    from loralab.decomposition.study import corpus_tokens
    from loralab.models import load_tokenizer
    from loralab.tasks.corpora import load_corpus

    texts = {name: load_corpus(name, data_dir) for name in corpora}
    short = [name for name, text in texts.items() if len(text) < CHARS_PER_TOKEN * seq_len]
    if not short:
        return []
    try:
        tokenizer = load_tokenizer(model_id)
    except ConfigError as exc:  # models.Unreachable: a hub tokenizer offline and not cached
        return exc.problems
    except (OSError, ValueError) as exc:
        return [f"'--model' = {model_id!r}: its tokenizer does not load ({str(exc).strip()[:300]})"]
    counts = {name: tokens.numel() for name, tokens in corpus_tokens(tokenizer, short, data_dir, texts).items()}
    return window_problems(counts, seq_len)


CHARS_PER_TOKEN = 32
"""``corpus_problems`` counts a corpus's tokens only below this many characters per requested token."""


def _skeleton(model_id: str):
    """(the causal LM's skeleton, []), or (None, why it has none: one line per problem; [] where the load will
    tell). A GGUF file is converted first (the load right after reads the conversion anyway)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loralab import models
    from loralab.skeleton import build_skeleton

    def unbuildable(exc: Exception) -> list[str]:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        return [f"'--model' = {model_id!r}: no causal language model can be built from its config ({lines[0][:300]})"]

    try:
        models.resolve_model_path(model_id)
    except (OSError, ValueError, KeyError) as exc:  # a GGUF file that does not convert
        return None, unbuildable(exc)
    skeleton = build_skeleton(model_id, "causal_lm")
    if skeleton is not None:
        return skeleton, []
    try:  # build_skeleton never raises: read and build again, for the reason
        if model_id.startswith(models.RANDOM_PREFIX):
            config = models.random_config(model_id, "causal_lm")
        else:
            config = models._from_pretrained(AutoConfig.from_pretrained, model_id, "config")
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except models.Unreachable as exc:
        return None, exc.problems
    except (OSError, ValueError, KeyError) as exc:  # no config.json, an unknown model_type, not a causal LM
        return None, unbuildable(exc)
    return None, []


def save_path_problems(save_path, force: bool) -> list[str]:
    """``--save-path`` must be a new or empty folder (an adapter trained on the residual model there names it
    as its base: overwriting it would change that base under it), or any folder with ``force``; never a file."""
    from pathlib import Path

    if save_path is None:
        return []
    path = Path(save_path)
    if path.exists() and not path.is_dir():
        return [f"'--save-path' = {str(save_path)!r} is a file; it must be a folder (new or empty)"]
    if path.is_dir() and any(path.iterdir()) and not force:
        return [f"'--save-path' = {str(save_path)!r} is a folder that is not empty: give a new or empty folder, "
                "or --force to write over what is there"]
    return []


def device_problems(device: str | None) -> list[str]:
    """``--device`` must be a torch device this machine has: cpu, cuda or cuda:N (None: cuda if available)."""
    import torch

    if device is None:
        return []
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return [f"'--device' = {device!r} is not a torch device; allowed: cpu, cuda, cuda:N"]
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return [f"'--device' = {device!r}: no CUDA GPU is visible here; allowed: cpu"]
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return [f"'--device' = {device!r}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1})"]
    return []
