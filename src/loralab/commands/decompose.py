"""``loralab decompose``: CorDA adapters (KPA/IPA) and the full-decompose perplexity study."""

from __future__ import annotations

import json


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
    p.add_argument("--save-path", default=None, help="residual model -> DIR, initial adapter -> DIR/adapter")
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
    p.add_argument("--out", default="results/corda", help="full-decompose report folder")
    p.add_argument("--data-dir", default=None, help="local data folder (default: $LORALAB_DATA_DIR)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def run(args) -> int:
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
                  out_dir=args.out, use_cache=args.use_cache, dtype=args.dtype, device=device, fmt=args.calib_format)
        return 0
    if len(args.r) != 1:
        raise SystemExit(f"--r takes one rank in mode {mode!r}, got {args.r}")
    options = {"normalisation": args.normalisation, "scaling": args.scaling, "cov_dtype": args.cov_dtype,
               "solver": args.solver}
    info = build_adapter(args.model, args.r[0], mode=mode, calib_dataset=args.calib_dataset or "nqopen",
                         calib_size=args.calib_size, seed=args.seed, seqlen=args.calib_seqlen,
                         batch_size=args.batch_size, save_path=args.save_path, use_cache=args.use_cache,
                         target_modules=args.target_modules, data_dir=data_dir, fmt=args.calib_format,
                         sampling=args.calib_sampling, dtype=args.dtype, device=device, options=options)
    print(json.dumps(info, indent=2, default=str))
    return 0
