"""Write the shipped GLUE experiment folders (seed 000's table, seed 003's LoRA-FA study).

Each folder holds only what differs from loralab's defaults (which already are seed 000's GLUE
settings: 3 epochs, lr 4e-5, batch 32, max_length 128, linear schedule, AdamW with weight decay
0.01, seed 0). Re-run after changing a recipe: ``python scripts/make_glue_experiments.py``.

  experiments/glue-roberta/<method>/<task>/   seed 000 (roberta-base, r=128, alpha=128, dropout 0)
  experiments/glue-minilm/<method>/<task>/    the same recipe on MiniLM-L6 (runs offline)
  experiments/lorafa-svd/<task>/<init>-r<r>-lr<lr>/   seed 003 (roberta-base, attention q/k/v/o)
  experiments/lorafa-svd-minilm/<task>/<init>-r<r>-lr<lr>/   the same study on MiniLM-L6 (runs offline)
"""

import json
import shutil
from pathlib import Path

from peft import LoraConfig

ROOT = Path(__file__).resolve().parents[1] / "experiments"
GLUE_TASKS = ["sst2", "mrpc", "cola", "qnli", "rte", "stsb"]
# seed 000: all linear layers except the classifier head; r = alpha = 128, dropout 0
SEED000_ADAPTERS = {
    "full": None,
    "lora": {},
    "dora": {"use_dora": True},
    "pissa": {"init_lora_weights": "pissa"},
    # IPA: covariance from 256 random samples of the task's train split (calibration defaults)
    "corda": {"init_lora_weights": "corda", "corda_config": {"corda_method": "ipm"}},
}
# seed 003: batch 64, 30 epochs, 6 % warmup then linear decay; ranks and lrs from its grid
SEED003_TASKS = {"mrpc": 3668, "rte": 2490, "cola": 8551}  # train sizes, for one eval per epoch
SEED003_GRID = [(2, 4e-4), (4, 1e-4), (4, 4e-4)]
SEED003_INITS = ["lorafa_qr", "svd_lorafa", "svd_lorafa_corrected"]
ATTENTION = ["query", "key", "value", "attention.output.dense"]


def write(folder: Path, params: dict, adapter: dict | None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_parameters.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    if adapter is not None:
        LoraConfig(**adapter).save_pretrained(folder)
        # peft writes a README.md model card; the experiment folder does not need it
        (folder / "README.md").unlink(missing_ok=True)
        # peft keeps a module list as a set and writes it in hash order: sort it, so that
        # regenerating gives the same file (and the same configuration hash in results)
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main():
    for family, model_id in (("glue-roberta", "FacebookAI/roberta-base"), ("glue-minilm", None)):
        shutil.rmtree(ROOT / family, ignore_errors=True)
        for method, extra in SEED000_ADAPTERS.items():
            for task in GLUE_TASKS:
                params = {"task": f"glue/{task}"}
                if model_id:
                    params["model_id"] = model_id
                adapter = None
                if extra is not None:
                    adapter = {"r": 128, "lora_alpha": 128, "lora_dropout": 0.0, "target_modules": "all-linear", **extra}
                write(ROOT / family / method / task, params, adapter)
    for family, model_id in (("lorafa-svd", "FacebookAI/roberta-base"), ("lorafa-svd-minilm", None)):
        shutil.rmtree(ROOT / family, ignore_errors=True)
        write_seed003(family, model_id)


def write_seed003(family: str, model_id: str | None):
    for task, n_train in SEED003_TASKS.items():
        for init in SEED003_INITS:
            for r, lr in SEED003_GRID:
                params = {
                    **({"model_id": model_id} if model_id else {}),
                    "task": f"glue/{task}",
                    "init": init,
                    "batch_size": 64,
                    "num_epochs": 30,
                    "warmup_ratio": 0.06,
                    "learning_rate": lr,
                    "eval_steps": -(-n_train // 64),
                    "logging_steps": -(-n_train // 64),
                }
                # the seed's minLoRA default alpha = 1, so scaling = 1/r
                adapter = {"r": r, "lora_alpha": 1, "lora_dropout": 0.0, "target_modules": ATTENTION}
                write(ROOT / family / task / f"{init}-r{r}-lr{lr:g}", params, adapter)


if __name__ == "__main__":
    main()
