"""Write ``experiments/svd-family/`` (issue 15): the SVD-init family under one protocol on MiniLM-L6 GLUE.

Methods (one adapter shape for all: r = 16, alpha = 32, all linear layers except the head,
dropout 0): LoRA, PiSSA, MiLoRA, OLoRA, CorDA IPA and KPA, EVA, LoRA-GA, LoRA-FA and the corrected
SVD LoRA-FA. Tasks: RTE, MRPC, STS-B, CoLA. Seeds 0, 1, 2. Everything else is seed 000's GLUE
recipe (loralab's defaults: 3 epochs, batch 32, max_length 128, linear schedule, AdamW with weight
decay 0.01); data-driven inits calibrate on 256 random rows of the task's train split.

  experiments/svd-family/seed000-lr/<method>/<task>/seed<k>/   (a) seed 000's learning rate, 4e-5, dev
  experiments/svd-family/sweep/<method>/<task>/lr<lr>/         learning-rate sweep, seed 0, scored on a
                                                               held-out 10 % of the train split (never dev)
  experiments/svd-family/tuned/<method>/<task>/seed<k>/        (b) each method's best sweep lr per task, dev

``python scripts/make_svd_family_experiments.py`` writes (a) and the sweep; after the sweep ran,
``python scripts/make_svd_family_experiments.py --pick RESULTS_DIR [...]`` reads its result files
(matched by the recorded experiment name), picks the lr with the best held-out score per method
and task (RTE accuracy, MRPC mean of accuracy and F1, STS-B mean of Pearson and Spearman, CoLA
Matthews correlation; ties to the smaller lr) and writes (b) plus ``tuned/chosen_lr.json``.
``scripts/gpu_svd_family.sh`` runs all three on one GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from peft import LoraConfig

ROOT = Path(__file__).resolve().parents[1] / "experiments" / "svd-family"
TASKS = ["rte", "mrpc", "stsb", "cola"]
SEEDS = [0, 1, 2]
SEED000_LR = 4e-5
SWEEP_LRS = [4e-5, 2e-4, 1e-3]
SWEEP_EPOCHS = 1
"""The sweep trains one epoch (of 90 % of the train split) per lr, to fit the GPU budget."""
HOLDOUT = {"eval_split": "holdout", "holdout_fraction": 0.1, "holdout_seed": 0}
ADAPTER = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
# method folder -> (adapter_config additions, training_parameters additions)
METHODS = {
    "lora": ({}, {}),
    "pissa": ({"init_lora_weights": "pissa"}, {}),
    "milora": ({}, {"init": "milora"}),
    "olora": ({"init_lora_weights": "olora"}, {}),
    "corda-ipa": ({"init_lora_weights": "corda", "corda_config": {"corda_method": "ipm"}}, {}),
    "corda-kpa": ({"init_lora_weights": "corda", "corda_config": {"corda_method": "kpm"}}, {}),
    "eva": ({"init_lora_weights": "eva", "eva_config": {"rho": 2.0}}, {}),
    "lora-ga": ({"init_lora_weights": "lora_ga", "lora_ga_config": {}}, {}),
    "lorafa": ({}, {"optimizer": "lorafa"}),
    "svd-lorafa-corrected": ({}, {"init": "svd_lorafa_corrected"}),
}
HEADLINE = {  # held-out score used to pick the lr
    "rte": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "cola": ("matthews_correlation",),
}


def write(folder: Path, params: dict, adapter: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_parameters.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    LoraConfig(**adapter).save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # peft's model card


def lr_name(lr: float) -> str:
    return f"lr{lr:g}"


def write_runs(kind: str, lrs: dict[tuple[str, str], float]):
    for method, (adapter_extra, params_extra) in METHODS.items():
        for task in TASKS:
            for seed in SEEDS:
                params = {"task": f"glue/{task}", "seed": seed, "learning_rate": lrs[method, task], **params_extra}
                write(ROOT / kind / method / task / f"seed{seed}", params, {**ADAPTER, **adapter_extra})


def write_initial():
    for kind in ("seed000-lr", "sweep"):  # tuned/ is --pick's, from results: left as it is
        shutil.rmtree(ROOT / kind, ignore_errors=True)
    write_runs("seed000-lr", {(m, t): SEED000_LR for m in METHODS for t in TASKS})
    for method, (adapter_extra, params_extra) in METHODS.items():
        for task in TASKS:
            for lr in SWEEP_LRS:
                params = {"task": f"glue/{task}", "seed": 0, "learning_rate": lr, "num_epochs": SWEEP_EPOCHS,
                          **HOLDOUT, **params_extra}
                write(ROOT / "sweep" / method / task / lr_name(lr), params, {**ADAPTER, **adapter_extra})


def score(task: str, metrics: dict) -> float:
    return sum(metrics[k] for k in HEADLINE[task]) / len(HEADLINE[task])


def pick(result_dirs: list[str]) -> dict:
    """Best sweep lr per (method, task) from result files; raises SystemExit naming what is missing."""
    found: dict[tuple[str, str], dict[float, float]] = {}
    for root in result_dirs:
        for path in Path(root).rglob("*.json"):
            try:
                record = json.loads(path.read_text())
                name = record["run_info"]["experiment_name"]
            except (ValueError, KeyError, TypeError):
                continue
            parts = name.split("/")
            if len(parts) != 5 or parts[:2] != ["svd-family", "sweep"] or record["train_info"]["status"] != "success":
                continue
            _, _, method, task, _ = parts
            lr = record["run_info"]["config"]["training_parameters"]["learning_rate"]
            found.setdefault((method, task), {})[lr] = score(task, record["eval"])
    missing = [f"{m}/{t}" for m in METHODS for t in TASKS if len(found.get((m, t), {})) < len(SWEEP_LRS)]
    if missing:
        raise SystemExit(f"sweep results incomplete for {len(missing)} method/task pair(s), e.g. {missing[:3]}")
    chosen = {k: max(sorted(v), key=lambda lr: (v[lr], -lr)) for k, v in found.items()}
    shutil.rmtree(ROOT / "tuned", ignore_errors=True)
    write_runs("tuned", chosen)
    table = {f"{m}/{t}": {"lr": chosen[m, t], "holdout_scores": {f"{lr:g}": s for lr, s in sorted(found[m, t].items())}}
             for m, t in sorted(chosen)}
    (ROOT / "tuned" / "chosen_lr.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pick", nargs="+", metavar="RESULTS_DIR", help="write (b) from the sweep's result files")
    args = parser.parse_args(argv)
    if args.pick:
        table = pick(args.pick)
        for key, row in table.items():
            print(f"{key}: lr {row['lr']:g}  (held-out {row['holdout_scores']})")
    else:
        write_initial()
        print(f"wrote {ROOT}/seed000-lr and {ROOT}/sweep")
    return 0


if __name__ == "__main__":
    sys.exit(main())
