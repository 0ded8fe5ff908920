"""``loralab bench``: peer (transformers + peft) vs loralab training throughput, side by side."""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--preset", choices=("tiny", "full"), default="tiny",
                        help="tiny: small random models, about a minute on CPU; full: Llama-3-8B, Llama-3.2-1B, roberta-base shapes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--output", type=Path, default=None, help="write the rows as a JSON list here")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (tiny 3, full 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (tiny 1, full 3)")
    parser.add_argument("--only", default=None, help="keep workloads whose name contains this")
    parser.add_argument("--no-compile", action="store_true",
                        help="speed.compile = false for the loralab stack (default: loralab run's, on for causal LMs on cuda)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="speed.cuda_graphs = false for the loralab stack (default: loralab run's, on on cuda)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler summary of each loralab row (cuda), in a second pass after all rows are timed")


def run(args) -> int:
    import torch

    from loralab.speed.bench import run_bench, table

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    for key in ("steps", "warmup"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise SystemExit(f"--{key} = {value}: must be a positive integer")
    def save(rows):
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(rows, indent=1) + "\n")

    speed = {}  # explicit keys win over loralab run's defaults
    if args.no_compile:
        speed["compile"] = False
    if args.no_cuda_graphs:
        speed["cuda_graphs"] = False
    rows, profiles = run_bench(args.preset, device, steps=args.steps, warmup=args.warmup, only=args.only,
                               speed=speed, profile=args.profile, on_row=save)
    print(table(rows))
    for text in profiles:
        print(text)
    save(rows)
    if args.output:
        if profiles:
            args.output.with_suffix(".profile.txt").write_text("\n\n".join(profiles) + "\n")
    return 0
