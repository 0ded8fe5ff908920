"""(Re)generate the shipped causal-LM experiment folders under ``experiments/llm``.

Each folder gets ``adapter_config.json`` written by ``LoraConfig(...).save_pretrained`` (seed 004's
format), a ``training_parameters.json`` holding only the keys that differ from
``loralab.config``'s defaults, and a ``README.md`` naming the source of every setting and every
place where the source's code and its documentation disagree.

    python scripts/make_llm_experiments.py [--out experiments/llm] [--check]

``--check`` rewrites nothing and exits 1 if a folder on disk differs from what this script makes (an
adapter_config.json: as a configuration the installed peft reads, not byte for byte, ``adapter_configs_agree``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from loralab.config import NESTED, default_parameters
from loralab.tasks.commonsense import COMMONSENSE

REPO = Path(__file__).resolve().parents[1]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# --------------------------------------------------------------------------------------------- seed 000
# purplepig4657/llm-low-rank-adaptation-eval: math_train.py / code_train.py, README table values
# (r=32, alpha=32; the CLI defaults are 128). HF Trainer defaults fill what the script leaves out:
# max_grad_norm 1.0 and, because per_device_train_batch_size is never passed, a micro-batch of 8.
SEED000_TRAIN = {
    "max_length": 512, "max_train_samples": 100_000, "num_epochs": 1, "batch_size": 1,
    "gradient_accumulation_steps": 128, "learning_rate": 2e-5, "lr_scheduler": "cosine",
    "warmup_ratio": 0.03, "weight_decay": 0.0, "max_grad_norm": 1.0, "dtype": "bfloat16", "seed": 0,
    # batch 1 x accumulation 128 in HF Trainer before 4.46: the mean of per-sample token means
    "loss_normalization": "samples",
}
SEED000_NOTE = """\
Source: seed 000 (purplepig4657/llm-low-rank-adaptation-eval, {script}) with the README's table
values: Meta-Llama-3-8B, r=32, alpha=32, dropout 0, every nn.Linear whose name lacks
"classifier" (so lm_head too: peft's "all-linear" would skip it, hence the explicit list),
train[:100000], max length 512, 1 epoch, lr 2e-5, cosine, warmup 0.03, weight decay 0,
batch 1 x gradient accumulation 128, bf16 weights.

Known differences between the seed's README and what its script actually ran:
- Effective batch: the script never passes per_device_train_batch_size, so the HF Trainer
  default of 8 applied: it ran 8 x 128 = 1,024 sequences per optimizer step (~97 steps over
  100k rows), not the documented 1 x 128 = 128. This folder uses the documented 128; set
  batch_size 8 to reproduce the script's batch (a plausible cause of its low GSM8K 34.34). Its
  loss is then still not the script's: transformers < 4.46 took the token mean of each
  micro-batch of 8 and averaged those, which neither loss_normalization "samples" nor
  "tokens" is.
- The script's CLI defaults are r=128, alpha=128; the README and its output paths say r32.
- The Trainer was not given a seed (HF default 42); the README says seed 0, used here.
- max_grad_norm 1.0 is the HF Trainer default the script inherited.
- Gradient checkpointing was on in the script (memory only; loralab has no switch for it).
- Scoring: where loralab's default rules differ from the seed's (CorDA's evaluation code,
  bigcode's harness), ../../README.md ("Where a shipped recipe scores differently from its
  seed's harness") says how, and which option applies the seed's rule.
{extra}"""

SEED000_EVAL = {
    "math": {
        "eval_tasks": ["gsm8k", "math"],
        "eval_options": {"prompt": "seed000"},
        "extra": "- Evaluation: GSM8K and MATH, greedy, CorDA's stop strings and extraction, with the seed's own\n"
        "  inference prompt (eval option prompt=seed000: adds \"After providing your solution, write\n"
        "  'The answer is: ' ...\"); max_tokens 1024 for GSM8K and 2048 for MATH come from the evals.\n",
    },
    "code": {
        "eval_tasks": ["humaneval", "mbpp"],
        "eval_options": {"sampling": "bigcode"},
        "extra": "- Evaluation: bigcode-evaluation-harness defaults (eval option sampling=bigcode): one sample\n"
        "  at T=0.2, top_p 0.95, max_length_generation 512 counting the prompt, pass@1.\n",
    },
}

# --------------------------------------------------------------------------------------------- seed 001
# iboing/CorDA: tools/train_{LoRA,CorDA}.sh, build_corda.py (tools/build_KPA.sh, build_IPA.sh).
SEED001_TRAIN = {
    "model_id": "meta-llama/Llama-2-7b-hf", "task": "metamath", "max_length": 512, "max_train_samples": 100_000,
    "num_epochs": 1, "batch_size": 1, "gradient_accumulation_steps": 128, "learning_rate": 2e-5,
    "lr_scheduler": "cosine", "warmup_ratio": 0.03, "weight_decay": 0.0, "max_grad_norm": 1.0, "dtype": "bfloat16",
    # transformers 4.40.1 (the repository's requirements), batch 1 x accumulation 128: per-sample means
    "loss_normalization": "samples",
}
SEED001_NOTE = """\
Source: seed 001 (iboing/CorDA, NeurIPS 2024), Llama-2-7B fine-tuned on MetaMathQA train[:100000]
for 1 epoch: tools/train_{{LoRA,CorDA}}.sh (batch 1 x grad-accum 128, lr 2e-5, cosine, warmup 0.03,
weight decay 0, bf16, max length 512), rank 128 with alpha = r on q,k,v,o,gate,up,down.
{extra}
README results (GSM8K / MATH / NQ-open / TriviaQA): {results}.
Evaluation: GSM8K and MATH with the official CorDA prompt, greedy, max_tokens 1024 / 2048 (the
evals' defaults); NQ-open and TriviaQA through lm-eval (nq_open_lm_eval, triviaqa_lm_eval; needs
the optional lm-eval package) for the forgetting study. max_grad_norm 1.0 is the HF Trainer default the script inherited.
"""

# --------------------------------------------------------------------------------------------- seed 002
# NVlabs/DoRA commonsense_reasoning: llama_7B_Dora.sh / llama_7B_Dora_qkv.sh + finetune.py.
SEED002_TRAIN = {
    "model_id": "yahma/llama-7b-hf", "task": "commonsense170k", "max_length": 256, "num_epochs": 3,
    "batch_size": 16, "gradient_accumulation_steps": 1, "lr_scheduler": "linear", "weight_decay": 0.0,
    "warmup_ratio": 0.0031, "max_grad_norm": 1.0, "dtype": "float16", "seed": 42,
    "eval_tasks": list(COMMONSENSE),
}
SEED002_NOTE = """\
Source: seed 002 (NVlabs/DoRA commonsense_reasoning, {script} and finetune.py), LLaMA-7B
(yahma/llama-7b-hf) on LLM-Adapters' commonsense_170k: DoRA r=32, alpha=64, dropout 0.05, the
indented LLM-Adapters template with train_on_inputs=True, cutoff 256, 120 rows held out
(seed 42), batch 16 = micro-batch 16, 3 epochs, fp16, AdamW, linear schedule.
{extra}
Translation notes:
- warmup_steps=100 in the source; loralab has only warmup_ratio: 0.0031 ~ 100 / (3 x 170,000/16)
  steps at the nominal dataset size (commonsense_170k.json was not available here to count).
- seed 42 and max_grad_norm 1.0 are the HF Trainer defaults finetune.py inherited.
- The source kept the best of the checkpoints saved every 80 steps by validation loss
  (load_best_model_at_end); loralab evaluates the final adapter.
- dora_simple=True (the norm is detached) is what peft's use_dora does as well.
- Evaluation: the eight commonsense test sets with the LLM-Adapters eval prompt, 4-beam search,
  32 new tokens, first-match answer extraction, exact-match accuracy.
"""

# --------------------------------------------------------------------------------------------- seed 004
# peft method_comparison/MetaMathQA (v1, 41921013f) default_training_params.json + run.py.
PEFT_MC_TRAIN = {
    "model_id": "meta-llama/Llama-3.2-3B", "task": "metamath_peft", "max_length": 768, "batch_size": 4,
    "max_steps": 5000, "learning_rate": 1e-4, "weight_decay": 0.1, "lr_scheduler": "cosine", "warmup_ratio": 0.1,
    "max_grad_norm": 1.0, "dtype": "bfloat16", "seed": 0, "eval_batch_size": 50, "eval_tasks": ["gsm8k"],
    "eval_options": {"gsm8k": {"prompt": "method_comparison", "parser": "method_comparison"}},
    "generation": {"batch_size": 50},
}
PEFT_MC_NOTE = """\
Source: seed 004, peft method_comparison/MetaMathQA (default_training_params.json, data.py,
run.py): Llama-3.2-3B in bf16 with fp32 adapters, all of MetaMathQA minus rows over 1,300
characters, prompt "Question: {{query}} Think step by step.\\nAnswer:" with no loss masking,
max length 768, 5,000 steps x batch 4, AdamW lr 1e-4, weight decay 0.1, cosine with 10 % warmup,
grad-norm clip 1.0, seed 0; greedy generation of up to 300 new tokens on the 1,319 GSM8K test
problems, answers parsed by peft's parse_answer (gsm8k eval options prompt and parser =
method_comparison; 300 new tokens come from that prompt's protocol).
{extra}
Not reproduced: the 50-question GSM8K-train validation every 250 steps (logging only in the
source) and the bucketed batching (sorted by length within 20-batch buckets, no shuffling);
loralab shuffles with the seed.
"""
PEFT_MC_RESULTS = "peft's own result (Llama-3.2-3B, L40S, 2026-07): {}"


def experiments() -> list[dict]:
    """Every shipped experiment: folder, LoraConfig keyword arguments, parameter overrides, note."""
    out = []
    for kind, task, script in (("math", "metamath", "math_train.py"), ("code", "codefeedback", "code_train.py")):
        ev = SEED000_EVAL[kind]
        base = {**SEED000_TRAIN, "model_id": "meta-llama/Meta-Llama-3-8B", "task": task,
                "eval_tasks": ev["eval_tasks"], "eval_options": ev["eval_options"]}
        lora = {"r": 32, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": LLAMA_ALL + ["lm_head"]}
        variants = {
            "lora": ({}, {}, "LoRA_HF: peft default init (A kaiming-uniform, B = 0)."),
            "dora": ({"use_dora": True}, {}, "DoRA_HF: LoraConfig(use_dora=True)."),
            "pissa": ({"init_lora_weights": "pissa"}, {}, "PiSSA_HF: init_lora_weights='pissa' (full SVD)."),
            "corda-ipa": (
                {"init_lora_weights": "corda", "corda_config": {"corda_method": "ipm", "use_float16_for_covariance": True}},
                {"calibration": {"num_samples": 256, "sampling": "first", "batch_size": 1}},
                "CorDA_HF: IPA (corda_method ipm) with use_float16_for_covariance=True; calibration on the\n"
                "first 256 tokenized training rows (prompt + response), batch 1, as the script did (its README\n"
                "says a random 256).",
            ),
        }
        for name, (lora_extra, params_extra, what) in variants.items():
            out.append({
                "path": f"seed000-llama3-8b-{kind}/{name}",
                "lora": {**lora, **lora_extra},
                "params": {**base, **params_extra},
                "note": SEED000_NOTE.format(script=script, extra=f"- Method: {what}\n" + ev["extra"]),
            })

    lora128 = {"r": 128, "lora_alpha": 128, "lora_dropout": 0.0, "target_modules": LLAMA_ALL}
    seed001 = {
        "lora-r128": (
            {}, {"eval_tasks": ["gsm8k", "math", "nq_open_lm_eval", "triviaqa_lm_eval"]},
            "LoRA: LoraConfig(r=128, lora_alpha=128, init_lora_weights=True) as train_model.py builds it.",
            "42.68 / 5.92 / 1.91 / 44.17",
        ),
        "corda-kpa-nqopen-r128": (
            {"init_lora_weights": "corda", "corda_config": {"corda_method": "kpm"}},
            {"eval_tasks": ["gsm8k", "math", "nq_open_lm_eval", "triviaqa_lm_eval"],
             "calibration": {"dataset": "nqopen", "num_samples": 256, "seed": 233, "sampling": "random", "batch_size": 1}},
            "CorDA KPA (knowledge-preserved): the smallest r components of the covariance-oriented SVD,\n"
            "covariance from 256 random NQ-open training questions (build_corda.py --calib_dataset nqopen,\n"
            "seed 233).",
            "45.64 / 6.94 / 10.44 / 45.23",
        ),
        "corda-ipa-metamath-r128": (
            {"init_lora_weights": "corda", "corda_config": {"corda_method": "ipm"}},
            {"eval_tasks": ["gsm8k", "math"],
             "calibration": {"dataset": "metamath", "num_samples": 256, "seed": 233, "sampling": "random", "batch_size": 1}},
            "CorDA IPA (instruction-previewed): the largest r components, covariance from 256 random\n"
            "MetaMathQA query/response pairs in the Llama-2 chat format (build_corda.py --first_eigen\n"
            "--calib_dataset MetaMATH, seed 233).",
            "54.59 / 8.54 / - / -",
        ),
    }
    for name, (lora_extra, params_extra, what, res) in seed001.items():
        out.append({
            "path": f"seed001-llama2-7b-metamath/{name}",
            "lora": {**lora128, **lora_extra},
            "params": {**SEED001_TRAIN, **params_extra},
            "note": SEED001_NOTE.format(extra=what, results=res),
        })

    dora = {"r": 32, "lora_alpha": 64, "lora_dropout": 0.05, "use_dora": True}
    seed002 = {
        "dora-r32": (
            {"target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]}, {"learning_rate": 1e-4},
            "llama_7B_Dora.sh", "DoRA on q,k,v,up,down; lr 1e-4 as the README's r=32 row (the script's own default\n"
            "is 2e-4). README result: 69.7 / 83.4 / 78.6 / 87.2 / 81.0 / 81.9 / 66.2 / 79.2, average 78.4.",
        ),
        "dora-qkv-r32": (
            {"target_modules": ["q_proj", "k_proj", "v_proj"]},
            {"learning_rate": 2e-4, "magnitude_only_modules": ["o_proj", "gate_proj", "up_proj", "down_proj"]},
            "llama_7B_Dora_qkv.sh", "Paper Sec. 5.6 variant: full DoRA on q,k,v and magnitude-only DoRA\n"
            "(Wdecompose_target_modules) on o,gate,up,down; lr 2e-4 as that script.",
        ),
    }
    for name, (lora_extra, params_extra, script, what) in seed002.items():
        out.append({
            "path": f"seed002-llama-7b-commonsense/{name}",
            "lora": {**dora, **lora_extra},
            "params": {**SEED002_TRAIN, **params_extra},
            "note": SEED002_NOTE.format(script=script, extra=what),
        })

    mc = {"r": 32, "lora_alpha": 64, "lora_dropout": 0.0}
    peft_mc = {
        "lora-rank32": ({}, {}, "LoRA r=32, alpha=64, target_modules null (peft's Llama default: q_proj, v_proj),\n"
                        "as peft's experiments/lora/llama-3.2-3B-rank32.", "47.84 % (9,175,040 trainable)"),
        "dora-rank32": ({"use_dora": True}, {}, "DoRA, otherwise as lora-rank32 (peft's lora/llama-3.2-3B-rank32-dora).",
                        "46.93 % (9,289,728 trainable)"),
        "lorafa-rank32": ({}, {"optimizer": "lorafa"}, "LoRA-FA: lora_A frozen at its kaiming init, peft's\n"
                          "create_lorafa_optimizer (peft's lora/llama-3.2-3B-rank32-lorafa).", "40.41 % (3,670,016 trainable)"),
        "pissa-rank32": ({"init_lora_weights": "pissa"}, {}, "PiSSA init on q,v; peft's benchmark never ran it.", None),
        "olora-rank32": ({"init_lora_weights": "olora"}, {}, "OLoRA init on q,v; peft's benchmark never ran it.", None),
        "corda-ipa-rank32": (
            {"init_lora_weights": "corda", "corda_config": {"corda_method": "ipm"}, "target_modules": ["q_proj", "v_proj"]},
            {"calibration": {"num_samples": 256, "sampling": "random", "batch_size": 1}},
            "CorDA IPA on q,v (preprocess_corda needs an explicit target list), covariance from 256 random\n"
            "training rows in the training format; peft's benchmark never ran it.", None,
        ),
    }
    for name, (lora_extra, params_extra, what, res) in peft_mc.items():
        extra = f"Method: {what}\n" + (PEFT_MC_RESULTS.format(res) + "\n" if res else "")
        out.append({
            "path": f"metamathqa-llama-3.2-3b/{name}",
            "lora": {**mc, **lora_extra},
            "params": {**PEFT_MC_TRAIN, **params_extra},
            "note": PEFT_MC_NOTE.format(extra=extra),
        })
    return out


def diff_from_defaults(params: dict) -> dict:
    """Only the keys (and nested sub-keys) whose values differ from loralab's defaults."""
    defaults = default_parameters()
    out = {}
    for key, value in params.items():
        if key not in defaults:
            raise KeyError(f"unknown training parameter {key!r}")
        if key in NESTED:
            sub = {k: v for k, v in value.items() if defaults[key].get(k) != v}
            if sub:
                out[key] = sub
        elif defaults[key] != value:
            out[key] = value
    return out


def adapter_config_json(lora_kwargs: dict) -> dict:
    """What ``LoraConfig(...).save_pretrained`` writes for these arguments."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig

    kwargs = dict(lora_kwargs, task_type="CAUSAL_LM", bias="none")
    if isinstance(kwargs.get("corda_config"), dict):
        kwargs["corda_config"] = CordaConfig(**kwargs["corda_config"])
    with tempfile.TemporaryDirectory() as tmp:
        LoraConfig(**kwargs).save_pretrained(tmp)
        data = json.loads((Path(tmp) / "adapter_config.json").read_text())
    if isinstance(data.get("target_modules"), list):  # peft stores a set: fix the order for diffs
        data["target_modules"] = sorted(data["target_modules"])
    return data


def adapter_configs_agree(stored: str, made: str) -> bool:
    """Whether two adapter_config.json texts are the same configuration as the installed peft reads them: each
    loaded by ``LoraConfig.from_pretrained`` (so fields a newer peft adds take their defaults on both sides), compared
    without ``peft_version`` (the version that wrote the file, not a setting: peft 0.22's release made every stored
    file differ by it alone) and with ``target_modules`` as a set."""
    from peft import LoraConfig

    def read(text: str) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "adapter_config.json").write_text(text)
            data = LoraConfig.from_pretrained(tmp).to_dict()
        data.pop("peft_version", None)
        if isinstance(data.get("target_modules"), (list, set)):
            data["target_modules"] = sorted(data["target_modules"])
        return data

    return read(stored) == read(made)


def render(exp: dict) -> dict[str, str]:
    """File name -> text for one experiment folder."""
    return {
        "adapter_config.json": json.dumps(adapter_config_json(exp["lora"]), indent=2, sort_keys=True) + "\n",
        "training_parameters.json": json.dumps(diff_from_defaults(exp["params"]), indent=2) + "\n",
        "README.md": f"# {exp['path']}\n\n{exp['note']}",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "experiments" / "llm"))
    parser.add_argument("--check", action="store_true", help="compare with the folders on disk, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for exp in experiments():
        folder = Path(args.out) / exp["path"]
        for name, text in render(exp).items():
            path = folder / name
            if args.check:
                same = adapter_configs_agree if name == "adapter_config.json" else str.__eq__
                if not path.exists() or not same(path.read_text(), text):
                    stale.append(str(path))
            else:
                folder.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if stale:
        print("out of date (run scripts/make_llm_experiments.py):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
