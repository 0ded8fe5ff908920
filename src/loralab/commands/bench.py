"""``loralab bench``: peer (transformers + peft) vs loralab training throughput, side by side.

``loralab bench [--preset tiny|full]``: random-weight models of fixed shapes, one row per
workload x method x stack. ``loralab bench --experiment DIR [--random-weights] [--steps N]``:
one experiment folder's recipe through ``loralab run``'s own path and through transformers'
``Trainer`` + peft (``loralab.speed.bench.run_experiment_bench``).
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--preset", choices=("tiny", "full"), default=None,
                        help="tiny: small random models, about a minute on CPU; full: Llama-3-8B, Llama-3.2-1B, roberta-base shapes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--output", type=Path, default=None, help="write the rows as a JSON list here (--experiment: one JSON object)")
    parser.add_argument("--experiment", type=Path, default=None, metavar="DIR",
                        help="bench one experiment folder's recipe: loralab run vs transformers Trainer + peft")
    parser.add_argument("--random-weights", action="store_true",
                        help="--experiment: the recipe's model architecture with random weights (random:<shape> model id)")
    parser.add_argument("--task", default=None,
                        help="--experiment: train on this task instead of the recipe's (e.g. gsm8k when MetaMathQA is not on disk)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per row (tiny 3, full 8); --experiment: optimizer steps per stack (default 3, at least 2)")
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
    if args.experiment is not None:
        return _run_experiment(args, device)
    if args.random_weights or args.task:
        raise SystemExit("--random-weights and --task go with --experiment DIR")

    def save(rows):
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(rows, indent=1) + "\n")

    speed = {}  # explicit keys win over loralab run's defaults
    if args.no_compile:
        speed["compile"] = False
    if args.no_cuda_graphs:
        speed["cuda_graphs"] = False
    rows, profiles = run_bench(args.preset or "tiny", device, steps=args.steps, warmup=args.warmup, only=args.only,
                               speed=speed, profile=args.profile, on_row=save)
    print(table(rows))
    for text in profiles:
        print(text)
    save(rows)
    if args.output:
        if profiles:
            args.output.with_suffix(".profile.txt").write_text("\n\n".join(profiles) + "\n")
    return 0


def _run_experiment(args, device: str) -> int:
    from loralab.config import ConfigError
    from loralab.speed.bench import BenchError, experiment_table, run_experiment_bench

    if args.preset or args.only or args.profile or args.warmup or args.no_compile or args.no_cuda_graphs:
        raise SystemExit("--experiment takes its speed options from the experiment's training_parameters.json; "
                         "--preset, --only, --profile, --warmup, --no-compile and --no-cuda-graphs do not apply")
    try:
        result = run_experiment_bench(args.experiment, steps=args.steps or 3, random_weights=args.random_weights,
                                      task=args.task, device=args.device)
    except (ConfigError, BenchError) as exc:
        raise SystemExit(f"loralab bench --experiment {args.experiment}: {exc}") from exc
    print(experiment_table(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0
