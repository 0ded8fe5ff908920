"""``loralab decompose``: CorDA adapters (KPA/IPA) and the full-decompose perplexity study.

Bad arguments (a flag of the other mode, a rank a targeted layer cannot hold, a target module name
that matches no module, named with the closest one, a calibration set or study corpus that is neither
local nor reachable, a --calib-seqlen beyond the model's max_position_embeddings, a study --r that
empties every layer or a --seq-len longer than a study corpus, a --save-path that is a file or a folder
not empty without --force, a --device not here, ...) stop before any
weights load with exit 2 and every problem at once (``problems``: the model is read from its config). The study writes
each row as it finishes to ``--out`` (default ``<$LORALAB_OUTPUT_DIR or outputs>/corda-study``,
outside git's tracked files); SIGINT or SIGTERM stops it with exit 130 keeping the finished rows,
and the same command again scores only the missing ones. Result files of other settings in
``--out`` are not overwritten without ``--force``."""

from __future__ import annotations

import json
import sys

STUDY_FOLDER = "corda-study"
STUDY_CORPORA = ("wikitext2", "ptb")
"""The corpora the study scores (``build.run_study``'s default)."""


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="hub id, local transformers folder, .gguf or packaged:NAME")
    p.add_argument("--r", type=int, nargs="+", required=True,
                   help="adapter rank (kpa/ipa); for full-decompose a list of r (components discarded per layer)")
    p.add_argument("--mode", default="kpa", choices=["kpa", "ipa", "full-decompose"],
                   help="kpa: smallest r as the adapter; ipa: largest r; full-decompose: the perplexity study")
    p.add_argument("--first-eigen", action="store_true", help="same as --mode ipa (the official flag)")
    p.add_argument("--calib-dataset", default=None,
                   help="nqopen, triviaqa (traivia_qa), MetaMATH, codefeedback, WizLMinstruct, alpaca, wikitext2, ptb, "
                        "c4, or a local file (default: nqopen for kpa/ipa, alpaca for full-decompose)")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration sample (official 2048)")
    p.add_argument("--calib-format", default="llama2-chat", choices=["llama2-chat", "training"])
    p.add_argument("--calib-sampling", default="random", choices=["random", "first"])
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (pads are masked)")
    p.add_argument("--seed", type=int, default=233)
    p.add_argument("--use-cache", action="store_true", help="cache calibration set, covariances and eigens on disk")
    p.add_argument("--save-path", default=None, help="residual model -> DIR, initial adapter -> DIR/adapter "
                   "(its base_model_name_or_path: DIR, the model it belongs to)")
    p.add_argument("--target-modules", nargs="+", default=None, help="default: the seven Llama projections")
    p.add_argument("--normalisation", default="constant", choices=["constant", "count"],
                   help="covariance / 256 (official) or / number of samples (peft)")
    p.add_argument("--scaling", default="signed_max", choices=["signed_max", "abs_max"])
    p.add_argument("--cov-dtype", default="float32", choices=["float32", "input"])
    p.add_argument("--solver", default="auto", choices=["auto", "svd", "gram", "lowrank"])
    p.add_argument("--method", nargs="+", default=["cov-aware", "act-aware", "plain"],
                   choices=["cov-aware", "act-aware", "plain"], help="full-decompose methods")
    p.add_argument("--seq-len", type=int, default=2048, help="perplexity window (full-decompose)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows per corpus")
    p.add_argument("--out", default=None,
                   help=f"full-decompose report folder (default: <$LORALAB_OUTPUT_DIR or outputs>/{STUDY_FOLDER}); "
                        "a folder holding this study's rows is resumed, one holding other settings' files refused")
    p.add_argument("--force", action="store_true",
                   help="full-decompose: overwrite result files of other settings in --out instead of refusing; "
                        "kpa/ipa: write into a --save-path folder that is not empty")
    p.add_argument("--data-dir", default=None, help="local data folder (default: $LORALAB_DATA_DIR)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def study_out(args) -> str:
    """``--out``, or the default study folder under the run output folder (not tracked by git)."""
    from loralab.run.build import output_root

    return args.out or str(output_root() / STUDY_FOLDER)


STUDY_ONLY = ("method", "seq_len", "max_windows", "out")
"""Flags only the full-decompose study reads."""
ADAPTER_ONLY = ("first_eigen", "save_path", "target_modules", "calib_sampling", "normalisation", "scaling",
                "cov_dtype", "solver")
"""Flags only kpa/ipa (the adapter) read."""


def problems(args) -> list[str]:
    """Every problem that the arguments, the model's config (no weights) and the data folder show: a flag
    of the other mode (given with a value other than its default), the numbers and the calibration set
    (``arguments.argument_problems``), ``--save-path``, ``--device``, the model id, ``--calib-seqlen`` against its
    trained positions and, for kpa/ipa, the rank against every targeted layer, for the study an ``--r`` that
    empties every layer (``checks.model_problems``); the study's perplexity corpora, there and at least
    ``--seq-len`` tokens long with the model's tokenizer (``checks.corpus_problems``)."""
    import argparse
    import os

    from loralab.decomposition import arguments, checks

    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    full = args.mode == "full-decompose"
    other = ("kpa/ipa", ADAPTER_ONLY) if full else ("full-decompose", STUDY_ONLY)
    found = [f"'--{dest.replace('_', '-')}' = {getattr(args, dest)!r} applies to --mode {other[0]} only, not "
             f"--mode {args.mode} (allowed: leave it out)" for dest in other[1]
             if getattr(args, dest) != defaults.get_default(dest)]
    data_dir = args.data_dir or os.environ.get("LORALAB_DATA_DIR")
    found += arguments.argument_problems(
        mode=args.mode, rs=args.r, calib_dataset=args.calib_dataset or ("alpaca" if full else "nqopen"),
        calib_size=args.calib_size, calib_seqlen=args.calib_seqlen, batch_size=args.batch_size, data_dir=data_dir,
        **({"seq_len": args.seq_len, "max_windows": args.max_windows} if full else {}))
    found += checks.save_path_problems(args.save_path, args.force) + checks.device_problems(args.device)
    rank = args.r[0] if not full and len(args.r) == 1 and args.r[0] >= 1 else None
    from loralab.decomposition.build import PROJECTIONS

    model = checks.model_problems(args.model, rank=rank, target_modules=args.target_modules or PROJECTIONS,
                                  calib_seqlen=args.calib_seqlen, study_rs=args.r if full else ())
    found += model
    if full:
        from loralab.tasks.data_check import data_problems

        corpora = data_problems(list(STUDY_CORPORA), data_dir)
        found += [f"'--data-dir': the study's perplexity corpus {line}" for line in corpora]
        model_ok = all(line.startswith(("'--calib-seqlen'", "'--r'")) for line in model)  # not the id or config
        if model_ok and not corpora and args.seq_len > 0:  # the tokenizer loads, the corpora are there
            found += checks.corpus_problems(args.model, args.seq_len, STUDY_CORPORA, data_dir)
    return found


def run(args) -> int:
    """0 on success; 2 with every problem when the arguments or the data cannot work, before any weights load
    (``problems``); 130 when the study is interrupted (SIGINT, or SIGTERM: ``signals.stop_on_signals``)."""
    import signal

    from loralab.config import ConfigError
    from loralab.signals import stop_on_signals

    full = args.mode == "full-decompose"
    try:
        found = problems(args)
        if found:
            raise ConfigError(found, "loralab decompose")
        with stop_on_signals((signal.SIGTERM,) if full else ()):  # SIGTERM stops the study as SIGINT does
            return _run(args)
    except ConfigError as exc:  # Unreachable (hub data or model offline) included
        print(f"error: {exc}", file=sys.stderr)  # it begins "loralab decompose has N problem(s)"
        return 2
    except KeyboardInterrupt:
        if not full:
            raise
        print(f"interrupted: the finished rows are in {study_out(args)}; run the same command again to score the "
              "rest", file=sys.stderr)
        return 130


def _run(args) -> int:
    import os

    import torch

    from loralab.decomposition.build import build_adapter, run_study

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data_dir = args.data_dir or os.environ.get("LORALAB_DATA_DIR")
    mode = "ipa" if args.first_eigen and args.mode == "kpa" else args.mode
    if mode == "full-decompose":
        run_study(args.model, args.r, args.method, calib_dataset=args.calib_dataset or "alpaca",
                  calib_size=args.calib_size, seed=args.seed, calib_seqlen=args.calib_seqlen,
                  batch_size=args.batch_size, seq_len=args.seq_len, max_windows=args.max_windows, data_dir=data_dir,
                  out_dir=study_out(args), use_cache=args.use_cache, dtype=args.dtype, device=device,
                  fmt=args.calib_format, force=args.force)
        return 0
    options = {"normalisation": args.normalisation, "scaling": args.scaling, "cov_dtype": args.cov_dtype,
               "solver": args.solver}
    info = build_adapter(args.model, args.r, mode=mode,
                         calib_dataset=args.calib_dataset or "nqopen",
                         calib_size=args.calib_size, seed=args.seed, seqlen=args.calib_seqlen,
                         batch_size=args.batch_size, save_path=args.save_path, use_cache=args.use_cache,
                         target_modules=args.target_modules, data_dir=data_dir, fmt=args.calib_format,
                         sampling=args.calib_sampling, dtype=args.dtype, device=device, options=options)
    print(json.dumps(info, indent=2, default=str))
    return 0
